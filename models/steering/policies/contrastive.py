"""Contrastive decoding: prefer what the big model knows and the small model does not."""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from models.steering.policies.base import LogitPolicy, check_same_tokenizer
from models.steering.state import BASE, RequestState, stack_logits

MAX_BETA = 100.0  # the small model's logits times this already swamp the big model's


class ContrastiveParams(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    beta: float = Field(
        0.5, ge=0, le=MAX_BETA, description="Weight of the small model's logits subtracted."
    )
    plausibility_alpha: float = Field(
        0.1, ge=0, le=1,
        description="Keep only tokens with big-model probability >= alpha * the top one's.",
    )  # fmt: skip


class Contrastive(LogitPolicy):
    """logits_big - beta * logits_small, restricted to the big model's plausible tokens (the
    engine applies the head: AdjustedLogits.plausibility_alpha)."""

    Params = ContrastiveParams

    @property
    def variants(self) -> list[str]:
        return [BASE]

    def start(self) -> None:
        check_same_tokenizer(self.context, self.name)

    def deltas(self, states: list[RequestState]) -> torch.Tensor:
        small = stack_logits([state.output(BASE) for state in states])
        return -self.row_params(states, "beta", small) * small

    def plausibility_alpha(self, state: RequestState) -> float | None:
        return state.params.plausibility_alpha
