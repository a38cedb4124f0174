"""The engine contract: what goes into an engine and what comes out of it.

Every engine (torch, vllm, exllamav2) speaks these types, and the Generator deployment and the
OpenAI serving layer depend on nothing else. Plain dataclasses, so they pickle across Ray.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from models.errors import TandemError


class EngineError(TandemError):
    """An engine-side failure that a client can act on (bad request, not loaded, full)."""


class PromptTooLongError(EngineError):
    """The prompt plus max_tokens does not fit the model's context window."""

    code = "context_length_exceeded"


class AdapterNotFoundError(EngineError):
    """A request named a LoRA adapter the engine does not have."""

    status_code = 404
    code = "adapter_not_found"


class EngineOverloadedError(EngineError):
    """The engine's queue is full; the client should retry later."""

    status_code = 429
    code = "engine_overloaded"


@dataclass
class SamplingParams:
    """How to pick tokens for one sequence.

    temperature 0 means greedy. top_k 0 means off. `logprobs` is None for no logprobs, or the
    number of top alternatives to return with each sampled token's own logprob (0 = only it).
    `seed` makes a sequence reproducible on its own, whatever else shares the batch.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None
    logit_bias: dict[int, float] = field(default_factory=dict)


@dataclass
class SteerVectorSpec:
    """A steering vector to add to the big model's hidden states: h_l += coeff * v_l."""

    name: str
    coeff: float
    layers: list[int] | None = None  # None: every layer the vector has


@dataclass
class GenerationRequest:
    """One sequence to generate. n > 1 in the API becomes n requests with derived ids and seeds."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    adapter: str | None = None  # LoRA adapter name; None = base model
    adapter_weights: dict[str, float] | None = None  # top-k router mix: name -> weight
    steer_vectors: list[SteerVectorSpec] = field(default_factory=list)  # static, whole request
    steering: dict[str, Any] | None = None  # policy + mode for the Steerer (see models.steering)


@dataclass
class TokenLogprob:
    """The sampled token's logprob and the top alternatives (token id, logprob)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class Intervention:
    """Something a steering policy did to a request, reported back to the client."""

    step: int  # index of the generated token at which it took effect
    action: str  # e.g. "SteerVector", "Backtrack", "ForceTokens"
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class RequestOutput:
    """What one engine step produced for one request: new tokens and text since the last one.

    `text` holds only text that is final: characters that might still be the start of a stop
    string, or that a backtrack could still take back, are held until they are settled.
    """

    request_id: str
    token_ids: list[int]
    text: str
    finished: bool = False
    finish_reason: str | None = None  # "stop", "length", "abort", "error"
    logprobs: list[TokenLogprob] | None = None
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0
    interventions: list[Intervention] = field(default_factory=list)
    error: str | None = None  # set when finish_reason == "error"


@dataclass
class EngineCapabilities:
    """What an engine can do, so the Generator can refuse what it cannot."""

    token_events: bool = True
    hidden_state_steering: bool = False
    per_row_lora: bool = False
    backtrack: bool = False
    logits_access: bool = True


@dataclass
class EngineStats:
    """Counters for metrics and tests."""

    num_running: int = 0
    num_waiting: int = 0
    max_running_seen: int = 0
    steps: int = 0
    generated_tokens: int = 0
    free_blocks: int = 0
    total_blocks: int = 0
    preemptions: int = 0
    observer_calls: int = 0  # step-observer calls: one per engine step with due steered rows


@runtime_checkable
class Engine(Protocol):
    """An inference engine as the Generator sees it."""

    capabilities: EngineCapabilities

    async def start(self) -> None: ...

    def generate(self, request: GenerationRequest) -> AsyncIterator[RequestOutput]: ...

    async def abort(self, request_id: str) -> None: ...

    async def check_health(self) -> None: ...

    async def load_adapter(self, name: str, path: str) -> None: ...

    async def unload_adapter(self, name: str) -> None: ...

    def stats(self) -> EngineStats: ...
