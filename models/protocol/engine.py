"""The Engine contract: every call the Generator makes on an inference engine.

The own torch engine (models.engine.torch_engine.TorchEngine) implements it; a fake in
tests/fakes/ implements it for the plumbing tests. A new engine (vLLM, exllamav2) implements
exactly these calls and nothing in the Generator changes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from typing import Any

import torch

from models.protocol.outputs import EngineStats, RequestOutput
from models.protocol.requests import GenerationRequest
from models.protocol.steering import StepObserver


class Engine(ABC):
    """An inference engine as the Generator sees it: requests in, token deltas out.

    `tokenizer` is the checkpoint's tokenizer (None for a token-level engine without one).
    """

    tokenizer: Any

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
