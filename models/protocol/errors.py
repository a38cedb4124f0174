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


class NotFoundError(EngineError):
    """A request named something the engine does not have; `naming` lists what it has."""

    status_code = 404
    template = "'{name}' does not exist; known: {listed}"

    @classmethod
    def naming(cls, name: str, known: Iterable[str], param: str | None = None):
        """The error for `name`, listing what there is (one wording per kind of thing)."""
        listed = ", ".join(sorted(known)) or "none"
        return cls(cls.template.format(name=name, listed=listed), param)


class AdapterNotFoundError(NotFoundError):
    """A request named a LoRA adapter the engine does not have."""

    code = "adapter_not_found"
    template = "adapter '{name}' is not loaded; loaded: {listed}"


class VectorNotFoundError(NotFoundError):
    """A request named a steering vector that is not registered."""

    code = "vector_not_found"
    template = "steering vector '{name}' is not registered; registered: {listed}"


class EngineFailedError(EngineError):
    """The engine itself failed (not the request); the replica should be replaced."""

    status_code = 503
    code = "engine_failed"


class EngineOverloadedError(EngineError):
    """The engine's queue is full; the client should retry later."""

    status_code = 429
    code = "engine_overloaded"
