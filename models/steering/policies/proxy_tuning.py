"""Proxy tuning: steer the big model by how a LoRA-tuned small model differs from its base."""

from __future__ import annotations

from functools import cached_property

import torch
from pydantic import BaseModel, ConfigDict, Field

from models.steering.policies.base import (
    LogitPolicy,
    PolicyParamsError,
    PolicySetting,
    check_same_tokenizer,
)
from models.steering.state import BASE, RequestState, stack_logits, variant_name

MAX_ALPHA = 100.0  # logits differences times this already swamp the big model's


class ProxyTuningParams(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    alpha: float = Field(
        1.0, ge=-MAX_ALPHA, le=MAX_ALPHA, description="Weight of (expert - base) small-model logits."
    )
    expert: str | None = Field(
        None, description="Small-model LoRA used as the expert; None = steering.expert_adapter."
    )


class ProxyTuning(LogitPolicy):
    """logits_big + alpha * (logits_small_expert - logits_small_base), every step.

    The expert is the small model with its LoRA, the base the same model without; both read the
    request's tokens in the same batched forward.
    """

    Params = ProxyTuningParams

    @cached_property
    def expert(self) -> str:
        expert = self.defaults.expert or self.context.expert_adapter
        if not expert:
            raise ValueError(
                f"policy '{self.name}' needs an expert adapter: set steering.expert_adapter or "
                "params.expert"
            )
        return variant_name(expert)

    @property
    def variants(self) -> list[str]:
        return [BASE, self.expert]

    def start(self) -> None:
        check_same_tokenizer(self.context, self.name)
        self.context.small_model.check_variant(self.expert)

    def params_for(self, request_params: dict) -> BaseModel:
        params = super().params_for(request_params)
        setting = PolicySetting(expert_adapter=self.context.expert_adapter)
        self.check_params(self.name, params, self.defaults.model_dump(), setting)
        return params

    @classmethod
    def check_params(
        cls, name: str, params: BaseModel, defaults: dict, setting: PolicySetting
    ) -> None:
        expert = defaults.get("expert") or setting.expert_adapter
        chosen = params.expert
        if chosen is not None and expert and variant_name(chosen) != variant_name(expert):
            raise PolicyParamsError(
                f"policy '{name}' uses expert '{expert}'; a request cannot choose another",
                "steering.params.expert",
            )

    def deltas(self, states: list[RequestState]) -> torch.Tensor:
        expert = stack_logits([state.output(self.expert) for state in states])
        delta = expert - stack_logits([state.output(BASE) for state in states])
        alpha = self.row_params(states, "alpha", expert)  # a column when the rows differ
        return delta if isinstance(alpha, float) and alpha == 1.0 else delta.mul_(alpha)
