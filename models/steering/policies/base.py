"""The policy interface: what a steering policy is given and what it answers."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict

from models.protocol.small_model import SmallModel
from models.protocol.steering import Action, Added, AdjustedLogits, Event, ForwardPass, Prefilled
from models.steering.state import RequestState

ENGINE_PARAMS = ("max_backtrack", "hidden_layers", "hidden_prompt_positions")
"""Keys of `steering.params` the engine reads itself (max_backtrack: tokens whose text it holds
back so a Backtrack stays invisible; hidden_layers: big-model layers ForwardPass.hidden
carries; hidden_prompt_positions: prompt tokens Prefilled.hidden carries); every policy accepts
them."""


class NoParams(BaseModel):
    """A policy without parameters."""

    model_config = ConfigDict(extra="forbid")


@dataclass
class PolicyContext:
    """What a policy may use besides the request: the small model, the big model's shape, and
    the steering config's vectors (with their contrastive pairs)."""

    small_model: SmallModel | None  # None when no small model is loaded
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

    def decide(self, rows: list[tuple[RequestState, list[Event]]]) -> list[list[Action]]:
        """The actions of every row of one step that uses this policy, row by row (the runtime
        calls it once per step and checks each action against its row's events). By default
        `on_event`, event by event; a policy whose work is tensor math overrides it to do that
        math once for all rows."""
        return [[a for event in events for a in self.on_event(state, event)]
                for state, events in rows]  # fmt: skip

    def big_vocab_delta(self, delta: torch.Tensor) -> torch.Tensor:
        """Fit small-model logits [..., small_vocab] to the big model's vocab (shared
        tokenizer: ids past the smaller table are padding rows; they get 0)."""
        size, have = self.context.big_vocab_size, delta.shape[-1]
        if have >= size:
            return delta[..., :size] if have > size else delta
        return torch.nn.functional.pad(delta, (0, size - have))


class LogitPolicy(Policy):
    """A policy that adjusts the big model's logits once per step: one AdjustedLogits per row,
    its delta made for all of the step's rows at once (`deltas`), so a step costs a few tensor
    operations whatever the batch size."""

    @abstractmethod
    def deltas(self, states: list[RequestState]) -> torch.Tensor:
        """Additive logit adjustments [rows, small vocab] for the rows' current step."""

    def plausibility_alpha(self, state: RequestState) -> float | None:
        """AdjustedLogits.plausibility_alpha for the row (None: no plausibility head)."""
        return None

    def on_event(self, state: RequestState, event: Event) -> list[Action]:
        return self.decide([(state, [event])])[0]

    def decide(self, rows: list[tuple[RequestState, list[Event]]]) -> list[list[Action]]:
        due = []  # (row, step): the first event of the row that takes an adjustment
        for row, (state, events) in enumerate(rows):
            for event in events:
                step = adjust_step(state, event)
                if step is not None:
                    due.append((row, step))
                    break
        actions: list[list[Action]] = [[] for _ in rows]
        if due:
            deltas = self.big_vocab_delta(self.deltas([rows[row][0] for row, _ in due]))
            for delta, (row, step) in zip(deltas, due, strict=True):  # views of one tensor
                alpha = self.plausibility_alpha(rows[row][0])
                actions[row].append(AdjustedLogits(step, None, delta, alpha))
        return actions

    @staticmethod
    def row_params(
        states: list[RequestState], name: str, like: torch.Tensor
    ) -> float | torch.Tensor:
        """One float parameter of each row: a number when all rows agree, else a column
        [rows, 1] on `like`'s device."""
        values = [float(getattr(state.params, name)) for state in states]
        if len(set(values)) == 1:
            return values[0]
        from models.engine.device import to_device

        return to_device(values, like.dtype, like.device)[:, None]


def adjust_step(state: RequestState, event: Event) -> int | None:
    """For logit policies: the step to send AdjustedLogits for after `event`, or None.

    The small model's outputs predict generated token `state.next_step`; a request gets one
    adjustment per step, answered on the first event of a call that allows AdjustedLogits.
    """
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
