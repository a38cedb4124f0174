"""The policy interface: what a steering policy is given and what it answers."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict

from models.steering.protocol import Action, Event
from models.steering.state import RequestState

ENGINE_PARAMS = ("max_backtrack",)
"""Keys of `steering.params` the engine reads itself (max_backtrack: tokens whose text it holds
back so a Backtrack stays invisible); every policy accepts them."""


class NoParams(BaseModel):
    """A policy without parameters."""

    model_config = ConfigDict(extra="forbid")


@dataclass
class PolicyContext:
    """What a policy may use besides the request: the small model, the big model's shape, and
    the steering config's vectors (with their contrastive pairs)."""

    small_model: Any  # models.steering.small_model.SmallModel, or None when none is loaded
    big_model_path: str | None
    big_vocab_size: int
    big_tokenizer: Any = None
    vectors: dict[str, Any] = field(default_factory=dict)  # name -> VectorConfig
    expert_adapter: str | None = None


class Policy(ABC):
    """A steering policy: per event of a request, the actions to take.

    Subclasses set `Params` (a pydantic model: the config's defaults, overridden per request)
    and `variants` (the small-model variants whose outputs `on_event` reads from
    `state.output(variant)`; "base" = the small model without LoRA), and implement `on_event`.
    `start` runs once when the runtime loads the policy (checks, precomputation).
    The runtime checks every action against the legality table.
    """

    Params: ClassVar[type[BaseModel]] = NoParams

    def __init__(self, name: str, defaults: dict[str, Any], context: PolicyContext):
        self.name = name
        self.context = context
        self.defaults = self.Params.model_validate(defaults)

    @property
    def variants(self) -> list[str]:
        return []

    @property
    def hidden_layers(self) -> list[int]:
        """Small-model blocks whose outputs `on_event` reads (SmallOutput.hidden)."""
        return []

    def start(self) -> None:  # noqa: B027 (an optional hook: doing nothing is the default)
        """Check what the policy needs and precompute; raise with a clear message if unusable."""

    def params_for(self, request_params: dict[str, Any]) -> BaseModel:
        """The config's defaults overridden by the request's `steering.params` (less the keys
        the engine owns)."""
        own = {k: v for k, v in request_params.items() if k not in ENGINE_PARAMS}
        return self.Params.model_validate({**self.defaults.model_dump(), **own})

    @abstractmethod
    def on_event(self, state: RequestState, event: Event) -> list[Action]:
        """The actions for one event of one request (each is checked against the legality
        table by the runtime)."""

    def big_vocab_delta(self, delta: torch.Tensor) -> torch.Tensor:
        """Fit a small-model vector [small_vocab] to the big model's vocab (shared tokenizer:
        ids past the smaller table are padding rows; they get 0)."""
        size = self.context.big_vocab_size
        if delta.numel() >= size:
            return delta[:size].contiguous()
        return torch.nn.functional.pad(delta, (0, size - delta.numel()))


def adjust_step(state: RequestState, event: Event) -> int | None:
    """For logit policies: the step to send AdjustedLogits for after `event`, or None.

    The small model's outputs predict generated token `state.next_step`; a request gets one
    adjustment per step, answered on the first event of a call that allows AdjustedLogits.
    """
    from models.steering.protocol import Added, ForwardPass, Prefilled

    if not isinstance(event, (Prefilled, ForwardPass, Added)):
        return None
    step = state.next_step
    if state.scratch.get("adjusted_step") == step:
        return None
    state.scratch["adjusted_step"] = step
    return step


class TokenizerMismatchError(ValueError):
    """Small and big model tokenizers differ, so their logits cannot be combined."""


def check_same_tokenizer(context: PolicyContext, policy: str) -> None:
    """Raise TokenizerMismatchError naming both models unless they share one vocabulary."""
    small = context.small_model
    if small is None:
        raise ValueError(f"policy '{policy}' needs a small model; none is configured")
    big = context.big_tokenizer
    if big is None or small.tokenizer is None:  # token-level checkpoints: sizes must agree
        if small.vocab_size != context.big_vocab_size:
            raise TokenizerMismatchError(
                f"policy '{policy}': the small model ({small.path}) has {small.vocab_size} "
                f"token ids, the big model ({context.big_model_path}) {context.big_vocab_size}"
            )
        return
    small_vocab, big_vocab = small.tokenizer.get_vocab(), big.get_vocab()
    if small_vocab != big_vocab:
        differing = sorted(set(small_vocab.items()) ^ set(big_vocab.items()))[:3]
        raise TokenizerMismatchError(
            f"policy '{policy}' combines logits of the small model ({small.path}, "
            f"{len(small_vocab)} tokens) and the big model ({context.big_model_path}, "
            f"{len(big_vocab)} tokens), but their tokenizers differ (e.g. {differing}); "
            "use a small model that shares the big model's tokenizer"
        )
