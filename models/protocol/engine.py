"""The Engine contract: every call the Generator makes on an inference engine.

The own torch engine (models.engine.torch_engine.TorchEngine) implements it; a fake in
tests/fakes/ implements it for the plumbing tests; the vLLM engine (models.engines.vllm)
implements it over vLLM's async engine. Each engine states what it can do
(`EngineCapabilities`); a request that needs more gets a 400 naming the engine and the
capability (`check_capabilities`), never a silent no-op.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, fields
from typing import Any

import torch

from models.protocol.errors import EngineError
from models.protocol.outputs import EngineStats, RequestOutput, Sink, pump_into
from models.protocol.requests import GenerationRequest
from models.protocol.steering import StepObserver


@dataclass(frozen=True)
class EngineCapabilities:
    """What an engine can do for a request (each field: a capability by name).

    token_events: a step observer sees every steered row's events and any legal action applies
    (ForceTokens, ForceOutput, ...). hidden_state_steering: steering vectors added to the hidden
    states (steer_vectors, SteerVector). logit_steering: AdjustedLogits from logit policies
    (proxy_tuning, contrastive). per_row_lora: one batch mixes LoRA adapters. adapter_mix: one
    row mixes several adapters by weight (the router's top-k). backtrack: generated tokens can
    be taken back (Backtrack, steering.params.max_backtrack). structured_output: grammar-exact
    output (response_format). hidden_state_capture: the residual stream of chosen layers comes
    back with each token (tandem.activations). speculative_decoding: a drafter proposes tokens
    the big model verifies (GenerationRequest.speculative_k).
    """

    token_events: bool = False
    hidden_state_steering: bool = False
    logit_steering: bool = False
    per_row_lora: bool = False
    adapter_mix: bool = False
    backtrack: bool = False
    structured_output: bool = False
    hidden_state_capture: bool = False
    speculative_decoding: bool = False

    @classmethod
    def all(cls) -> EngineCapabilities:
        return cls(**{f.name: True for f in fields(cls)})

    def missing(self, needs: Iterable[str]) -> list[str]:
        """The capabilities among `needs` this engine lacks (unknown names count as lacking)."""
        return [n for n in dict.fromkeys(needs) if not getattr(self, n, False)]


class UnsupportedByEngineError(EngineError):
    """The request needs a capability the configured engine does not have."""

    code = "unsupported_by_engine"


def request_needs(
    request: GenerationRequest, policy_needs: Mapping[str, Iterable[str]] | None = None
) -> dict[str, str]:
    """The capabilities a request needs, each with the request field that needs it.

    policy_needs: for each configured steering policy name, what the policy needs (a policy
    not listed needs token_events: it may answer with any action)."""
    needs: dict[str, str] = {}
    if request.steer_vectors:
        needs["hidden_state_steering"] = "steer_vectors"
    if request.adapter_weights and len(request.adapter_weights) > 1:
        needs["adapter_mix"] = "adapter"
    if request.constraint is not None and not request.constraint.optional:
        needs["structured_output"] = "response_format"
    if request.hidden_layers:
        needs["hidden_state_capture"] = "tandem.activations"
    if request.speculative_k:
        needs["speculative_decoding"] = "tandem.speculative"
    steering = request.steering
    if steering is not None:
        for name in (policy_needs or {}).get(steering.policy, ["token_events"]):
            needs.setdefault(name, "steering.policy")
        if steering.max_backtrack > 0:
            needs.setdefault("backtrack", "steering.params.max_backtrack")
    return needs


def check_capabilities(
    engine: Engine, request: GenerationRequest,
    policy_needs: Mapping[str, Iterable[str]] | None = None,
) -> None:  # fmt: skip
    """Raise UnsupportedByEngineError (400) naming the engine and the first capability the
    request needs that the engine lacks."""
    needs = request_needs(request, policy_needs)
    for name in engine.capabilities.missing(needs):
        what = f"steering policy '{request.steering.policy}'" if needs[name] == (
            "steering.policy") and request.steering else f"'{needs[name]}'"  # fmt: skip
        raise UnsupportedByEngineError(
            f"engine '{engine.name}' cannot do {name.replace('_', ' ')} ({name}), which "
            f"{what} needs; use an engine that can (engine.kind: torch does all)", needs[name])


class Engine(ABC):
    """An inference engine as the Generator sees it: requests in, token deltas out.

    `tokenizer` is the checkpoint's tokenizer (None for a token-level engine without one).
    `name` and `capabilities` say which engine it is and what it can do.
    """

    tokenizer: Any
    name: str = "engine"
    capabilities: EngineCapabilities = EngineCapabilities()

    @abstractmethod
    async def start(self) -> None:
        """Get ready to serve (idempotent); called before the first request."""

    @abstractmethod
    def check_request(self, request: GenerationRequest) -> None:
        """Raise the error (an EngineError) the request deserves, without admitting it."""

    @abstractmethod
    def generate(self, request: GenerationRequest) -> AsyncIterator[RequestOutput]:
        """Stream the request's outputs step by step; the last one has finished=True.
        Leaving the iterator early aborts the request."""

    def listen(self, request: GenerationRequest, sink: Sink) -> Callable[[], None]:
        """Hand each of the request's outputs (or the error it fails with) to `sink` on the
        caller's event loop, the last with finished=True; returns a function that stops it.
        This default runs `generate` in a task; an engine with a cheaper path (one callback
        per output, no task wake-up) overrides it."""
        return pump_into(self.generate(request), sink)

    @abstractmethod
    async def abort(self, request_id: str) -> None:
        """Stop a running request; its stream ends with finish_reason "abort"."""

    @abstractmethod
    async def check_health(self) -> None:
        """Raise when the engine can no longer serve."""

    @abstractmethod
    async def load_adapter(self, name: str, path: str) -> None:
        """Load a PEFT LoRA adapter directory under `name`."""

    @abstractmethod
    async def unload_adapter(self, name: str) -> None:
        """Unload adapter `name` (AdapterNotFoundError if it is not loaded)."""

    @abstractmethod
    def adapters(self) -> list[str]:
        """The names of the loaded adapters."""

    @abstractmethod
    def register_vector(self, name: str, vector: torch.Tensor) -> None:
        """A steering vector [num_layers, hidden] for SteerVector actions and steer_vectors."""

    @abstractmethod
    def set_step_observer(self, observer: StepObserver | None) -> None:
        """The observer consulted once per step for every due steered row."""

    @abstractmethod
    def stats(self) -> EngineStats:
        """A snapshot of the engine's counters."""

    def drain_step_times(self) -> list[float]:
        """Seconds each engine step took since the last call (default: none recorded)."""
        return []

    def shutdown(self) -> None:
        """Stop background work (default: nothing to stop)."""
        return None
