"""What a speculative-decoding drafter offers the engine: a few proposed tokens per row.

The engine verifies them with the big model in one forward and keeps exactly what it would
have generated itself (greedy rows: the big model's argmax; sampled rows: rejection sampling
against the distributions the proposals were drawn from). Implemented on the colocated small
model in models/steering/drafter.py; the engine only sees this protocol.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch


@dataclass
class DraftRow:
    """One sequence to draft for: its tokens so far (prompt + generated)."""

    request_id: str
    token_ids: list[int]
    num_prompt_tokens: int
    temperature: float  # 0: propose argmax tokens (no distributions needed)
    adapter: str | None = None  # the big model's LoRA adapter; the drafter may match it
    generator: torch.Generator | None = None  # the row's own randomness (seeded requests)
    logit_bias: dict[int, float] = field(default_factory=dict)  # the request's, for its drafts


@dataclass
class Draft:
    """Up to k proposed tokens; for sampled rows, `probs[i]` [vocab] (float32, sums to 1) is the
    distribution token i was drawn from."""

    token_ids: list[int]
    probs: torch.Tensor | None = None  # [len(token_ids), vocab]


class Drafter(Protocol):
    """Proposes tokens for several rows at once; its vocabulary is the big model's."""

    vocab_size: int

    def propose(self, rows: list[DraftRow], k: int) -> list[Draft]:
        """Up to k tokens per row, row for row."""

    def release(self, request_ids: list[str]) -> None:
        """Forget finished requests."""
