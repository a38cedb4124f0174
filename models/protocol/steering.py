"""Steering protocol: the events a policy sees and the actions it may answer with.

One legality table (`LEGAL_ACTIONS`) says which action may follow which event; `check_action`
is the only place that enforces it. The engine emits events per steered row after each step and
applies the actions it gets back; the Steerer (or a colocated runtime) turns events into actions.

Step numbering: `step` is the index of the generated token a thing is about. ForwardPass(step=s)
carries the logits from which generated token s is sampled; Sampled/Added(step=s) report it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple, get_args

import torch

from models.protocol.errors import EngineError

MAX_STEER_COEFF = 100.0
"""Largest |coeff| of a steering vector, whether a request sets it (static vectors, a policy's
params) or a policy answers it (SteerVector): far past where any vector still steers, short of
where one turns a model's hidden states into overflow."""

# ---- events ----------------------------------------------------------------------------------


@dataclass
class Prefilled:
    """The prompt has been prefilled; no token generated yet. hidden: the big model's residual
    stream [positions, len(layers), hidden_size] at the prompt's last
    `SteeringRequest.hidden_prompt_positions` tokens, when the row reads hidden states and asked
    for more than the last one (as ForwardPass.hidden: device or compact host copy)."""

    prompt_ids: list[int]
    step: int = 0
    hidden: torch.Tensor | None = None


@dataclass
class ForwardPass:
    """The big model ran for generated-token index `step`. logits: float32 [vocab], or None
    when the row did not ask for them (async rows get no logits: they would be stale).
    hidden: the residual stream [len(layers), hidden_size] after the big model's blocks
    `SteeringRequest.hidden_layers` (in that order) at the position sampled from, or None when
    the row asked for none: on the model's device in its dtype when colocated, else on the
    host in half precision."""

    step: int
    logits: torch.Tensor | None = None
    hidden: torch.Tensor | None = None


@dataclass
class Sampled:
    """The engine sampled `token_id` for generated-token index `step`."""

    step: int
    token_id: int


@dataclass
class Added:
    """Tokens were appended to the sequence, starting at generated-token index `step`."""

    step: int
    token_ids: list[int]
    forced: bool = False


Event = Prefilled | ForwardPass | Sampled | Added

# ---- actions ---------------------------------------------------------------------------------


@dataclass
class Noop:
    """Do nothing."""


@dataclass
class AdjustedPrefill:
    """Replace the prompt before anything is generated."""

    token_ids: list[int]


@dataclass
class AdjustedLogits:
    """Change the logits from which generated token `step` is sampled.

    `logits` replaces them outright; `delta` is added to them. Either may be a float tensor
    [vocab]. `plausibility_alpha` (0..1), when set, first restricts the result to tokens whose
    big-model probability is at least alpha times the most likely one's (the contrastive
    decoding head). An adjustment that reaches the engine after step `step` was sampled is late:
    it is dropped and reported as such.
    """

    step: int
    logits: torch.Tensor | None = None
    delta: torch.Tensor | None = None
    plausibility_alpha: float | None = None


@dataclass
class SteerVector:
    """Add coeff * vector to the big model's hidden states at `layers` from the next step on."""

    name: str
    coeff: float
    layers: list[int] | None = None


@dataclass
class ClearSteer:
    """Stop adding a steering vector (`name`), or all of them (None)."""

    name: str | None = None


@dataclass
class ForceTokens:
    """Append these tokens next instead of sampling."""

    token_ids: list[int]


@dataclass
class Backtrack:
    """Remove the last n generated tokens (their KV is rewound), then optionally append
    `token_ids`."""

    n: int
    token_ids: list[int] = field(default_factory=list)


@dataclass
class ForceOutput:
    """Finish the request now; its whole completion text becomes `text`."""

    text: str


@dataclass
class EmitError:
    """Finish the request with an error the client sees."""

    message: str


Action = (
    Noop
    | AdjustedPrefill
    | AdjustedLogits
    | SteerVector
    | ClearSteer
    | ForceTokens
    | Backtrack
    | ForceOutput
    | EmitError
)

_ANYTIME = (Noop, SteerVector, ClearSteer, ForceOutput, EmitError)

LEGAL_ACTIONS: dict[type, tuple[type, ...]] = {
    Prefilled: _ANYTIME + (AdjustedPrefill, ForceTokens, AdjustedLogits),
    ForwardPass: _ANYTIME + (AdjustedLogits, ForceTokens, Backtrack),
    Sampled: _ANYTIME + (ForceTokens, Backtrack),
    Added: _ANYTIME + (AdjustedLogits, ForceTokens, Backtrack),
}


class IllegalActionError(ValueError):
    """A policy answered an event with an action the legality table does not allow."""


def check_action(event: Event, action: Action) -> None:
    """Raise IllegalActionError naming both when `action` may not follow `event`."""
    allowed = LEGAL_ACTIONS[type(event)]
    if not isinstance(action, allowed):
        names = ", ".join(a.__name__ for a in allowed)
        raise IllegalActionError(
            f"action {type(action).__name__} is not allowed after event {type(event).__name__}"
            f" (allowed: {names})"
        )


def check_legal_after(events: list[Event], action: Action) -> None:
    """Legal when some event of a call allows it; else the error names the last event."""
    if not events or isinstance(action, LEGAL_ACTIONS[type(events[-1])]):
        return  # the usual case, on every row of every step: one lookup, no exception
    if any(isinstance(action, LEGAL_ACTIONS[type(e)]) for e in events):
        return
    check_action(events[-1], action)


# ---- what travels between Generator and Steerer ----------------------------------------------

SteeringMode = Literal["async", "sync", "colocated"]
STEERING_MODES: tuple[SteeringMode, ...] = get_args(SteeringMode)
WAITING_MODES: tuple[SteeringMode, ...] = ("sync", "colocated")  # the step waits for actions


@dataclass
class SteeringRequest:
    """The steering policy one request asked for, typed once at the API edge.

    policy: a policy name from the config. params: the policy's parameters (the config's
    defaults overlaid with the request's). mode: async (actions land when they arrive; the big
    model never waits), sync (each step waits for its actions), colocated (the policy runs
    inside the Generator replica). every: consult the policy every k generated tokens.
    timeout_s: a call slower than this leaves the row unsteered.
    """

    policy: str
    params: dict[str, Any] = field(default_factory=dict)
    mode: SteeringMode = "async"
    every: int = 1
    timeout_s: float = 2.0

    def __post_init__(self) -> None:
        if self.mode not in STEERING_MODES:
            raise EngineError(
                f"steering mode '{self.mode}' is not one of {', '.join(STEERING_MODES)}",
                param="steering.mode",
            )
        if self.every < 1:
            raise EngineError(f"steering every must be >= 1, got {self.every}", "steering.every")

    @property
    def waits(self) -> bool:
        """Whether the engine step waits for this row's actions before sampling."""
        return self.mode in WAITING_MODES

    @property
    def max_backtrack(self) -> int:
        """Generated tokens the engine holds back so a backtrack stays invisible."""
        return int(self.params.get("max_backtrack", 0))

    @property
    def hidden_layers(self) -> list[int]:
        """Big-model layers whose residual stream ForwardPass.hidden carries (a policy's
        `hidden_layers` parameter, e.g. the probe's)."""
        value = self.params.get("hidden_layers") or []
        if not isinstance(value, list) or not all(isinstance(x, int) for x in value):
            raise EngineError(f"steering params hidden_layers must be a list of layer indices, "
                              f"got {value!r}", param="steering.params.hidden_layers")  # fmt: skip
        return value

    @property
    def hidden_prompt_positions(self) -> int:
        """How many of the prompt's last tokens Prefilled.hidden carries (engine param)."""
        value = self.params.get("hidden_prompt_positions", 1)
        if not isinstance(value, int) or value < 1:
            raise EngineError(f"steering params hidden_prompt_positions must be an integer >= 1, "
                              f"got {value!r}", param="steering.params.hidden_prompt_positions")  # fmt: skip
        return value


@dataclass
class RowEvents:
    """The events of one steered row after one engine step.

    `token_ids` is the whole sequence so far (prompt + generated), sent when the Steerer may
    not hold this request's state (first call, or on resync); otherwise None. `mode` tells the
    Generator where the row is answered (colocated: in the replica; else the Steerer).
    """

    request_id: str
    events: list[Event]
    policy: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    num_prompt_tokens: int = 0
    token_ids: list[int] | None = None
    mode: SteeringMode = "async"


class PrefetchRow(NamedTuple):
    """A due row's tokens handed to a colocated observer before the step's call (see
    StepObserver.prefetch)."""

    request_id: str
    token_ids: list[int]
    num_prompt_tokens: int
    mode: SteeringMode


@dataclass
class RowActions:
    """The actions a policy answered for one row; `resync` asks the engine to resend the row
    with its full token_ids (the Steerer replica did not hold its state)."""

    request_id: str
    actions: list[Action] = field(default_factory=list)
    resync: bool = False
    error: str | None = None
    unavailable: bool = False  # with error: the Steerer was not consulted (its breaker is open)

    def owning_tensors(self) -> RowActions:
        """The same actions with every tensor owning its memory. A policy may answer a step's
        rows with views of one batched tensor; pickled on its own, each view would carry the
        whole batch, so answers that leave the process go through this first."""
        for action in self.actions:
            if isinstance(action, AdjustedLogits):
                for name in ("logits", "delta"):
                    tensor = getattr(action, name)
                    if tensor is not None and tensor.untyped_storage().nbytes() > tensor.nbytes:
                        setattr(action, name, tensor.clone())
        return self


class StepObserver(ABC):
    """What the engine consults once per step for all its due steered rows.

    `on_step` answers every row's events with its actions (a coroutine or a plain return);
    `prefetch` is an optional head start for an in-process observer, called right after the
    step's forward was queued; `release` forgets finished requests.
    """

    @abstractmethod
    def on_step(self, rows: list[RowEvents]) -> list[RowActions] | Awaitable[list[RowActions]]:
        """The actions for every row of one engine step, row for row."""

    def prefetch(self, rows: list[PrefetchRow]) -> None:
        """Start reading these rows' tokens before `on_step` asks (default: nothing)."""
        return None

    def release(self, request_ids: list[str]) -> None | Awaitable[None]:
        """Forget these finished requests (default: nothing to forget)."""
        return None
