"""Token choice per row: logit bias, temperature (0 = greedy), top-k, top-p, seeded sampling.

Each sequence owns a torch.Generator, so a seeded request draws the same random numbers
whatever else shares its batch. Logprobs are the log-softmax of the row's logits after
logit_bias and steering adjustments, before temperature and top-k/top-p truncation (the
model's own distribution as the client shaped it, defined for greedy rows too).
"""

from __future__ import annotations

import torch

from models.engine.sequence import Sequence
from models.engine.types import SamplingParams, TokenLogprob


def apply_logit_bias(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    if not params.logit_bias:
        return logits
    ids = torch.tensor(list(params.logit_bias), dtype=torch.long, device=logits.device)
    bias = torch.tensor(list(params.logit_bias.values()), dtype=logits.dtype, device=logits.device)
    return logits.index_add(0, ids, bias)


def truncate(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set logits outside the top-k / nucleus top-p set to -inf (1-D logits)."""
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        outside = probs.cumsum(-1) - probs > top_p
        logits = logits.masked_fill(
            torch.zeros_like(outside).scatter(0, order, outside), float("-inf")
        )
    return logits


def sample_row(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """One token from 1-D float32 logits (bias already applied)."""
    if params.temperature == 0:
        return int(logits.argmax())
    logits = truncate(logits / params.temperature, params.top_k, params.top_p)
    probs = logits.softmax(-1)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


def token_logprob(logits: torch.Tensor, token_id: int, num_top: int) -> TokenLogprob:
    logprobs = logits.float().log_softmax(-1)
    top: list[tuple[int, float]] = []
    if num_top > 0:
        values, ids = logprobs.topk(min(num_top, logprobs.shape[-1]))
        top = [(int(i), float(v)) for i, v in zip(ids, values, strict=True)]
    return TokenLogprob(token_id=token_id, logprob=float(logprobs[token_id]), top=top)


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> list[tuple[int, TokenLogprob | None]]:
    """Pick one token per row of logits [rows, vocab] (float32, adjustments applied except
    logit bias); returns (token id, logprob or None) per row."""
    plain = [s.request.params for s in seqs]
    if all(p.temperature == 0 and p.logprobs is None and not p.logit_bias for p in plain):
        return [(token, None) for token in logits.argmax(-1).tolist()]  # one device sync
    out = []
    for row, seq in zip(logits, seqs, strict=True):
        params = seq.request.params
        row = apply_logit_bias(row, params)
        token = sample_row(row, params, seq.generator)
        logprob = None if params.logprobs is None else token_logprob(row, token, params.logprobs)
        out.append((token, logprob))
    return out
