"""The policy interface: what a steering policy is given and what it answers."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from models.protocol.small_model import SmallModel
from models.protocol.steering import Action, Added, AdjustedLogits, Event, ForwardPass, Prefilled
from models.steering.state import RequestState

MAX_BACKTRACK = 256


class EngineParams(BaseModel):
    """Keys of `steering.params` the engine reads itself; every policy accepts them."""

    model_config = ConfigDict(extra="forbid")

    max_backtrack: int = Field(
        0, ge=0, le=MAX_BACKTRACK, description="Generated tokens whose text the engine holds "
        "back so a Backtrack inside them stays invisible to the client.",
    )  # fmt: skip
    hidden_layers: list[int] = Field(
        default_factory=list, description="Big-model layers whose residual stream "
        "ForwardPass.hidden carries to the policy (checked against the model at admission).",
    )  # fmt: skip
    hidden_prompt_positions: int = Field(
        1, ge=1, le=4096, description="Last prompt tokens whose states Prefilled.hidden carries.",
    )  # fmt: skip


ENGINE_PARAMS = tuple(EngineParams.model_fields)


class PolicyParamsError(ValueError):
    """A request's `steering.params` that its policy cannot take; `param` names the field
    (steering.params.<key>)."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


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
    FIXED_PARAMS: ClassVar[tuple[str, ...]] = ()
    """Params read once at `start` (from the config): a request may not change them."""
    needs: ClassVar[tuple[str, ...]] = ("token_events",)
    """The engine capabilities the policy needs (models.protocol.engine.EngineCapabilities):
    token_events by default, since a policy may answer with any action."""

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
        return self.typed_params(self.name, self.defaults.model_dump(), request_params)

    @classmethod
    def typed_params(
        cls, name: str, defaults: dict[str, Any], request_params: dict[str, Any]
    ) -> BaseModel:
        """`defaults` overridden by `request_params`, typed by `Params` (the engine's keys
        typed by EngineParams); PolicyParamsError naming the first field that is unknown, of
        the wrong type, out of range, or fixed by the config."""
        own = {k: v for k, v in request_params.items() if k not in ENGINE_PARAMS}
        _validate(EngineParams, {k: v for k, v in request_params.items() if k in ENGINE_PARAMS},
                  name)  # fmt: skip
        for key in cls.FIXED_PARAMS:
            if key in own and own[key] != defaults.get(key, cls.Params.model_fields[key].default):
                raise PolicyParamsError(
                    f"steering.params.{key} of policy '{name}' is set by the server's config "
                    f"({defaults.get(key)!r}); a request cannot change it",
                    f"steering.params.{key}",
                )
        return _validate(cls.Params, {**defaults, **own}, name)

    @classmethod
    def check_params(
        cls, name: str, params: BaseModel, defaults: dict[str, Any], setting: PolicySetting
    ) -> None:
        """Checks of typed params against what the server has (PolicyParamsError); the
        default has none."""
        return None

    @classmethod
    def vectors_named(cls, params: BaseModel) -> list[str]:
        """The big-model steering vectors these params name (they must be registered)."""
        return []

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


@dataclass
class PolicySetting:
    """What a request's params are checked against besides their types: the small model's
    expert adapter (steering.expert_adapter) and the big model's number of layers."""

    expert_adapter: str | None = None
    num_layers: int | None = None


def _validate(model: type[BaseModel], values: dict[str, Any], policy: str) -> BaseModel:
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        param = f"steering.params.{where}" if where else "steering.params"
        if err["type"] == "extra_forbidden":
            known = ", ".join([*model.model_fields, *ENGINE_PARAMS]) or "none"
            message = f"policy '{policy}' has no parameter '{where}'; its parameters: {known}"
        else:
            message = f"invalid value for '{param}' of policy '{policy}': {err['msg']}"
        raise PolicyParamsError(message, param) from None


class LogitPolicy(Policy):
    """A policy that adjusts the big model's logits once per step: one AdjustedLogits per row,
    its delta made for all of the step's rows at once (`deltas`), so a step costs a few tensor
    operations whatever the batch size."""

    needs: ClassVar[tuple[str, ...]] = ("logit_steering",)

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
            for row, step in due:  # only now: a call that raised may be retried row by row
                rows[row][0].scratch["adjusted_step"] = step
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
    adjustment per step (LogitPolicy.decide records it in scratch["adjusted_step"]), answered
    on the first event of a call that allows AdjustedLogits.
    """
    if not isinstance(event, (Prefilled, ForwardPass, Added)):
        return None
    step = state.next_step
    if state.scratch.get("adjusted_step") == step:
        return None
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
