"""The errors a client can act on, and the engine's own.

Each carries the HTTP status, the OpenAI error code and the offending parameter that the
Ingress turns into `{"error": {"message", "type", "param", "code"}}`. Subclasses set
`status_code` and `code`; they are built from the message (and param) only, so they pickle
through Ray handles unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable


class TandemError(Exception):
    """An error whose `message` tells the client what to do about it."""

    status_code = 400
    code: str | None = None
    param: str | None = None

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message = message
        if param is not None:
            self.param = param

    def __reduce__(self):
        return (type(self), (self.message, self.param))


class EngineError(TandemError):
    """An engine-side failure that a client can act on (bad request, not loaded, full)."""


class PromptTooLongError(EngineError):
    """The prompt plus max_tokens does not fit the model's context window."""

    code = "context_length_exceeded"


class AdapterNotFoundError(EngineError):
    """A request named a LoRA adapter the engine does not have."""

    status_code = 404
    code = "adapter_not_found"

    @classmethod
    def naming(cls, name: str, loaded: Iterable[str], param: str | None = None):
        """The error for adapter `name`, listing what is loaded (the one wording)."""
        listed = ", ".join(sorted(loaded)) or "none"
        return cls(f"adapter '{name}' is not loaded; loaded: {listed}", param)


class VectorNotFoundError(EngineError):
    """A request named a steering vector that is not registered."""

    status_code = 404
    code = "vector_not_found"

    @classmethod
    def naming(cls, name: str, known: Iterable[str], param: str | None = None):
        """The error for vector `name`, listing what exists (the one wording)."""
        listed = ", ".join(sorted(known)) or "none"
        return cls(f"steering vector '{name}' is not registered; registered: {listed}", param)


class EngineOverloadedError(EngineError):
    """The engine's queue is full; the client should retry later."""

    status_code = 429
    code = "engine_overloaded"
