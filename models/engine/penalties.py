"""Repetition penalties and min_tokens, batched over rows on the logits' device.

OpenAI's presence and frequency penalties count the row's generated tokens; the repetition
penalty (CTRL / Hugging Face) covers prompt and generated tokens alike: a positive logit is
divided by it, a negative one multiplied. min_tokens bars end-of-sequence and stop tokens until
the row has that many tokens. One scatter per kind for the whole batch; rows without penalties
are not touched.
"""

from __future__ import annotations

import torch

from models.engine.device import to_device
from models.engine.sequence import Sequence


def _counts(rows: list[list[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """Token counts [rows, vocab] of each row's ids (padding lands in a dropped column)."""
    width = max(1, max(len(r) for r in rows))
    ids = to_device([r + [vocab] * (width - len(r)) for r in rows], torch.int64, device)
    counts = torch.zeros(len(rows), vocab + 1, device=device)
    return counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=counts.dtype))[:, :vocab]


def apply_penalties(logits: torch.Tensor, seqs: list[Sequence],
                    eos_token_ids: set[int]) -> torch.Tensor:  # fmt: skip
    """logits [rows, vocab] with each row's penalties applied (a new tensor when any is)."""
    picked = [i for i, s in enumerate(seqs) if s.request.params.penalized()]
    if not picked:
        return logits
    device, vocab = logits.device, logits.shape[-1]
    params = [seqs[i].request.params for i in picked]
    rows = to_device(picked, torch.int64, device)
    sub = logits[rows]
    if any(p.presence_penalty or p.frequency_penalty for p in params):
        counts = _counts([seqs[i].generated_ids for i in picked], vocab, device)
        freq = to_device([p.frequency_penalty for p in params], sub.dtype, device)
        pres = to_device([p.presence_penalty for p in params], sub.dtype, device)
        sub = sub - freq[:, None] * counts - pres[:, None] * (counts > 0)
    if any(p.repetition_penalty != 1.0 for p in params):
        seen = _counts([seqs[i].token_ids for i in picked], vocab, device) > 0
        rep = to_device([p.repetition_penalty for p in params], sub.dtype, device)[:, None]
        sub = torch.where(seen, torch.where(sub > 0, sub / rep, sub * rep), sub)
    barred = [(j, sorted(eos_token_ids | set(p.stop_token_ids)))
              for j, p in enumerate(params) if seqs[picked[j]].num_generated < p.min_tokens]
    for j, ids in barred:
        sub[j, ids] = float("-inf")
    logits = logits.clone()
    logits[rows] = sub
    return logits
