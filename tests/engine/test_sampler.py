"""The batched sampler: exact categorical draws, per-row truncation, seeds independent of the
batch, logprobs, in one mixed batch."""

from __future__ import annotations

import math

import torch

from models.engine.sampler import sample, truncate
from models.engine.sequence import Sequence
from models.protocol.requests import GenerationRequest, SamplingParams


def seq(seed: int = 0, **params) -> Sequence:
    request = GenerationRequest("r", [1], SamplingParams(**params))
    return Sequence(request, torch.Generator().manual_seed(seed), 0)


def test_draws_follow_the_distribution():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(4000, 4).contiguous()
    seqs = [seq(seed=i, temperature=1.0) for i in range(4000)]
    counts = torch.bincount(torch.tensor([t for t, _ in sample(logits, seqs)]), minlength=4)
    expected = probs * 4000
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 16.3, (counts, chi2)  # p = 0.001 for 3 degrees of freedom


def test_rows_keep_their_own_settings_in_one_batch():
    logits = torch.tensor([[3.0, 2.9, 0.0, -1.0]]).expand(5, 4).contiguous()
    seqs = [
        seq(temperature=0),                      # greedy
        seq(temperature=5.0, top_k=1),           # top-k 1 == greedy
        seq(temperature=5.0, top_p=0.01),        # nucleus of one token == greedy
        seq(temperature=1.0, logit_bias={3: 100.0}),  # the bias wins
        seq(temperature=0, logprobs=2),
    ]
    tokens = [t for t, _ in sample(logits, seqs)]
    assert tokens == [0, 0, 0, 3, 0]
    lp = sample(logits, seqs)[4][1]
    expected = torch.log_softmax(logits[0], -1)
    assert math.isclose(lp.logprob, float(expected[0]), rel_tol=1e-5)
    assert [i for i, _ in lp.top] == [0, 1]


def test_seeded_rows_ignore_their_batch():
    logits = torch.randn(1, 50)
    alone = [sample(logits, [seq(seed=7, temperature=1.0)])[0][0] for _ in range(1)]
    crowd_logits = torch.cat([torch.randn(5, 50), logits])
    crowd = sample(crowd_logits, [seq(seed=i, temperature=1.0) for i in range(5)] + [seq(seed=7, temperature=1.0)])
    assert crowd[-1][0] == alone[0]


def test_truncate_per_row():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0], [4.0, 3.0, 2.0, 1.0]])
    out = truncate(logits, torch.tensor([2, 0]), torch.tensor([1.0, 0.5]))
    assert torch.isinf(out[0, 2:]).all() and torch.isfinite(out[0, :2]).all()
    assert torch.isfinite(out[1, 0]) and torch.isinf(out[1, 2:]).all()
