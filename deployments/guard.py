"""The Ingress's gate, before any route runs: the API key tier of the route and the body limit.

A pure ASGI middleware, so nothing of a refused request's body is read: a missing or wrong key
answers 401 (a use key on an admin route 403) and a `Content-Length` over the route's limit 413
before the first byte; a body without one (chunked) is counted as it arrives and refused (413)
as soon as it passes the limit, so no upload is buffered past it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from fastapi.responses import JSONResponse
from starlette._utils import get_route_path
from starlette.exceptions import HTTPException as StarletteHTTPException

from models.openai.errors import OpenAIError

OPEN_PATHS = ("/healthz",)
# (method, path pattern) of the routes that change the server: the admin key tier
ADMIN_ROUTES = [
    ("POST", r"/v1/(load|unload)_lora_adapter"),
    ("POST", r"/v1/steering/vectors(/extract)?"),
    ("DELETE", r"/v1/(files|vector_stores|steering/vectors)/.*"),
]
MULTIPART_SLACK = 64 * 1024  # form boundaries and headers around an uploaded file


class BodyTooLargeError(StarletteHTTPException):
    """A body that passed its route's limit while being read (FastAPI re-raises these as they
    are, from form parsing too); `error` is the OpenAI error to answer."""

    def __init__(self, error: OpenAIError):
        super().__init__(413, error.message)
        self.error = error


def too_large(size: str | int, limit: int) -> OpenAIError:
    return OpenAIError(f"request body is {size} bytes; the limit for this route is {limit}", 413,
                       code="request_too_large")  # fmt: skip


@dataclass
class GuardSettings:
    """What the guard enforces; the Ingress fills it from the config (app.state.guard)."""

    api_keys: list[str] = field(default_factory=list)
    admin_api_keys: list[str] = field(default_factory=list)
    max_request_bytes: int = 1 << 20
    upload_limits: dict[str, int] = field(default_factory=dict)  # exact POST path -> bytes

    def limit(self, method: str, path: str) -> int:
        return self.upload_limits.get(path, self.max_request_bytes) if method == "POST" else (
            self.max_request_bytes)  # fmt: skip

    def refusal(self, method: str, path: str, authorization: str) -> OpenAIError | None:
        """The auth error of a request, or None when it may go on."""
        admin_keys = self.admin_api_keys or self.api_keys
        admin = any(method == m and re.fullmatch(p, path) for m, p in ADMIN_ROUTES)
        if path.rstrip("/") in OPEN_PATHS or not (admin_keys if admin else self.api_keys):
            return None
        key = authorization[7:].strip() if authorization.startswith("Bearer ") else None
        if key is not None and key in admin_keys:
            return None
        if key is not None and key in self.api_keys:
            if not admin:
                return None
            return OpenAIError("this route changes the server: it needs an admin API key "
                               "(server.admin_api_keys)", 403, code="admin_key_required")
        return OpenAIError("invalid or missing API key (send 'Authorization: Bearer <key>')", 401,
                           code="invalid_api_key")  # fmt: skip


class RequestGuard:
    """ASGI middleware: auth tier, then Content-Length, then a running count of the body."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        settings = _settings(scope)
        if scope["type"] != "http" or settings is None:
            return await self.app(scope, receive, send)
        method, path = scope["method"], get_route_path(scope)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        error = settings.refusal(method, path, headers.get("authorization", ""))
        limit = settings.limit(method, path)
        length = headers.get("content-length", "")
        if error is None and length.isdigit() and int(length) > limit:
            error = too_large(length, limit)
        if error is not None:
            response = JSONResponse(error.to_dict(), status_code=error.status_code)
            return await response(scope, receive, send)
        seen = 0

        async def counted() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit:
                raise BodyTooLargeError(too_large(f"over {limit}", limit))
            return message

        await self.app(scope, counted, send)


def _settings(scope: dict) -> GuardSettings | None:
    app = scope.get("app")
    return getattr(getattr(app, "state", None), "guard", None)
