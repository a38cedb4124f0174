"""Presence, frequency and repetition penalties and min_tokens, in one mixed batch, against a
reference computed plainly (a Python loop over each row's tokens)."""

from __future__ import annotations

import torch

from models.engine.penalties import apply_penalties
from models.engine.sampler import sample
from models.engine.sequence import Sequence
from models.protocol.requests import GenerationRequest, SamplingParams

VOCAB = 12
EOS = 11


def seq(prompt: list[int], generated: list[int], **params) -> Sequence:
    s = Sequence(GenerationRequest("r", prompt, SamplingParams(**params)), torch.Generator(), 0)
    s.append(generated, [None] * len(generated))
    return s


def reference(logits: list[float], s: Sequence) -> list[float]:
    p, out = s.request.params, list(logits)
    for t in range(VOCAB):
        count = s.generated_ids.count(t)
        out[t] -= p.frequency_penalty * count + p.presence_penalty * (count > 0)
        if t in s.token_ids and p.repetition_penalty != 1.0:
            out[t] = out[t] / p.repetition_penalty if out[t] > 0 else out[t] * p.repetition_penalty
        if t == EOS and s.num_generated < p.min_tokens:
            out[t] = float("-inf")
    return out


def test_penalties_match_a_plain_reference_row_by_row():
    torch.manual_seed(0)
    logits = torch.randn(5, VOCAB)
    seqs = [
        seq([1, 2], [3, 3, 4], frequency_penalty=0.7),
        seq([1, 2], [3, 3, 4], presence_penalty=1.5),
        seq([1, 2, 5], [3, 3, 4], repetition_penalty=1.8),
        seq([1], [2], min_tokens=3, presence_penalty=-0.5),
        seq([1], [2, 2]),  # untouched
    ]
    got = apply_penalties(logits, seqs, {EOS})
    for i, s in enumerate(seqs):
        assert torch.allclose(got[i], torch.tensor(reference(logits[i].tolist(), s)), atol=1e-5)
    assert torch.equal(got[4], logits[4])


def test_penalties_change_the_greedy_token_the_way_they_should():
    logits = torch.tensor([[0.0, 5.0, 4.0, 0.0] + [-9.0] * (VOCAB - 4)]).expand(3, VOCAB)
    plain = seq([0], [1, 1], temperature=0)
    freq = seq([0], [1, 1], temperature=0, frequency_penalty=1.0)  # 5 - 2 < 4
    rep = seq([1], [], temperature=0, repetition_penalty=2.0)  # prompt token: 5 / 2 < 4
    tokens = [t for t, _ in sample(logits.contiguous(), [plain, freq, rep], {EOS})]
    assert tokens == [1, 2, 2]


def test_min_tokens_bars_the_end_until_reached():
    logits = torch.full((2, VOCAB), -5.0)
    logits[:, EOS] = 10.0
    early = seq([0], [4], temperature=0, min_tokens=2)
    done = seq([0], [4, 4], temperature=0, min_tokens=2)
    assert [t for t, _ in sample(logits, [early, done], {EOS})] == [0, EOS]
