"""OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}` with an HTTP status.

Every error a client can see goes through `OpenAIError`; `to_openai_error` maps the typed errors
of the rest of the code base (anything with `status_code` and `message`) onto it.
"""

from __future__ import annotations

from typing import Any

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_error",
    503: "service_unavailable_error",
    504: "timeout_error",
}


class OpenAIError(Exception):
    """An error returned to the client in OpenAI's JSON shape."""

    def __init__(
        self,
        message: str,
        status_code: int = 400,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status_code, "invalid_request_error")

    def to_dict(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def to_openai_error(exc: BaseException) -> OpenAIError:
    """Map any exception to an OpenAIError; typed errors keep their status, others become 500."""
    if isinstance(exc, OpenAIError):
        return exc
    inner = _unwrap(exc)
    if inner is not exc:
        return to_openai_error(inner)
    status = getattr(exc, "status_code", None)
    message = getattr(exc, "message", None) or str(exc)
    if isinstance(status, int):
        return OpenAIError(
            message, status, param=getattr(exc, "param", None), code=getattr(exc, "code", None)
        )
    return OpenAIError(f"internal error: {type(exc).__name__}: {message}", 500, code="internal_error")


def _unwrap(exc: BaseException) -> BaseException:
    """Ray wraps remote exceptions (RayTaskError); the typed cause is what the client needs."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException) and cause is not exc:
        return cause
    return exc
