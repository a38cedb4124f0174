"""HTTP plumbing the Ingress routes share: bodies in, OpenAI error JSON and SSE out."""

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

from fastapi import FastAPI, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel
from ray.serve.exceptions import BackPressureError
from starlette.exceptions import HTTPException as StarletteHTTPException

from deployments.telemetry import record_error
from models.openai.errors import OpenAIError, to_openai_error
from models.openai.protocol import parse_request

logger = logging.getLogger("ray.serve")

UPLOAD_READ_BYTES = 1 << 20
MAX_JSON_DEPTH = 64  # no OpenAI request nests near this; a deep one is an attack
M = TypeVar("M", bound=BaseModel)


def to_error(exc: BaseException) -> OpenAIError:
    """Any failure as an OpenAIError; FastAPI's own (bad form fields, 404 routes) included."""
    if isinstance(exc, RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first["loc"] if p != "body")
        return OpenAIError(f"invalid value for '{where}': {first['msg']}", 400, param=where)
    if isinstance(exc, StarletteHTTPException):  # guard.BodyTooLargeError carries its own
        return getattr(exc, "error", None) or OpenAIError(str(exc.detail), exc.status_code)
    if isinstance(exc, TimeoutError):
        return timed_out()
    if isinstance(exc, BackPressureError):  # a deployment's max_queued_requests: full
        return OpenAIError("the server is at capacity; retry later", 429, code="server_busy")
    return to_openai_error(exc)


def timed_out() -> OpenAIError:
    return OpenAIError("the request ran past the server's time limit (server.request_timeout_s)",
                       504, code="timeout")  # fmt: skip


RETRY_AFTER_S = {429: 1, 503: 5}  # a full queue drains fast; a failed replica is replaced


def error_response(exc: BaseException) -> JSONResponse:
    err = to_error(exc)
    record_error(err)
    if err.status_code >= 500:
        logger.exception("request failed", exc_info=exc)
    retry = RETRY_AFTER_S.get(err.status_code)
    headers = {"Retry-After": str(retry)} if retry else None
    return JSONResponse(err.to_dict(), status_code=err.status_code, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    """Every failure in `app` answers OpenAI's error JSON with its status."""

    async def handle(_: Request, exc: Exception) -> JSONResponse:
        return error_response(exc)

    for kind in (OpenAIError, RequestValidationError, StarletteHTTPException, Exception):
        app.add_exception_handler(kind, handle)
    install_body_schemas(app)


class OpenAIErrorRoute(APIRoute):
    """A route that answers its failures as OpenAI error JSON in any app that includes it."""

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def answer(request: Request):
            try:
                return await handler(request)
            except Exception as exc:
                return error_response(exc)

        return answer


async def read_json(request: Request, limit: int | None = None) -> Any:
    """The request body as JSON: 413 over the limit, 400 when it is not JSON."""
    length = request.headers.get("content-length")
    if limit is not None and length and length.isdigit() and int(length) > limit:
        raise OpenAIError(f"request body is {length} bytes; the limit is {limit}", 413)
    raw = await request.body()
    if limit is not None and len(raw) > limit:
        raise OpenAIError(f"request body is {len(raw)} bytes; the limit is {limit}", 413)
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise OpenAIError(f"the request body is not valid JSON: {exc}", 400,
                          code="invalid_json") from None
    except RecursionError:
        raise OpenAIError(f"the request body nests deeper than {MAX_JSON_DEPTH} levels", 400,
                          code="invalid_json") from None
    check_json_value(body)
    return body


def check_json_value(body: Any) -> None:
    """400 for JSON no request needs and the rest of the code should never meet: nesting
    deeper than MAX_JSON_DEPTH, or a string with a lone surrogate (valid JSON escapes, but
    not text: it cannot be encoded, tokenized or stored)."""
    todo = [(body, 1)]
    while todo:
        value, depth = todo.pop()
        if depth > MAX_JSON_DEPTH:
            raise OpenAIError(f"the request body nests deeper than {MAX_JSON_DEPTH} levels",
                              400, code="invalid_json")  # fmt: skip
        if isinstance(value, dict):
            todo += [(k, depth) for k in value] + [(v, depth + 1) for v in value.values()]
        elif isinstance(value, list):
            todo += [(v, depth + 1) for v in value]
        elif isinstance(value, str) and not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise OpenAIError("the request body holds a lone surrogate (\\ud800-\\udfff) "
                                  "in a string; send valid Unicode text", 400,
                                  code="invalid_json") from None


async def read_request(request: Request, model: type[M], limit: int | None = None) -> M:
    """The JSON body parsed into `model`; a problem is a 400 naming the field."""
    return parse_request(model, await read_json(request, limit))


async def read_upload(file: UploadFile, limit: int | None) -> bytes:
    """An uploaded file's bytes, refusing (413) as soon as they pass `limit`."""
    parts, size = [], 0
    while chunk := await file.read(UPLOAD_READ_BYTES):
        size += len(chunk)
        if limit is not None and size > limit:
            raise OpenAIError(f"'{file.filename}' is over the upload limit of {limit} bytes",
                              413, param="file", code="file_too_large")
        parts.append(chunk)
    return b"".join(parts)


async def ended_honestly(events: AsyncIterator[str], deadline: float) -> AsyncIterator[str]:
    """SSE events that always end with `data: [DONE]`: past `deadline` (the event loop's
    clock) the response stops with a timeout error event (504), and a failure of `events`
    (a Generator replica gone, say) sends its OpenAI error event first. Events that say how
    they end when cut short (`failure(error) -> events`, a Responses stream) end that way."""
    last, error = "", None
    try:
        while True:
            try:
                async with asyncio.timeout_at(deadline):
                    last = await anext(events)
            except StopAsyncIteration:
                break
            yield last
    except TimeoutError:
        error = timed_out()
    except Exception as exc:  # noqa: BLE001 - the client gets it as an error event
        error = to_error(exc)
        logger.warning("stream failed: %s", error.message)
    finally:
        await events.aclose()  # stops the request's work when the client went away too
    failure = getattr(events, "failure", None)
    if failure is not None:
        for event in failure(error.to_dict()["error"]) if error is not None else []:
            yield event
        return
    if error is not None:
        yield f"data: {json.dumps(error.to_dict())}\n\n"
    if not last.startswith("data: [DONE]"):
        yield "data: [DONE]\n\n"


BODY_SCHEMAS: dict[str, Any] = {}  # the models' nested schemas, for components/schemas


def body_schema(model: type[BaseModel]) -> dict[str, Any]:
    """`openapi_extra` of a route that reads its JSON body by hand (read_request): /docs,
    /openapi.json and schema-driven clients (and the fuzz test) see the body's schema."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    BODY_SCHEMAS.update(schema.pop("$defs", {}))
    return {"requestBody": {"required": True,
                            "content": {"application/json": {"schema": schema}}}}  # fmt: skip


def install_body_schemas(app: FastAPI) -> None:
    """app.openapi() with the nested schemas `body_schema` collected."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = generate()
            schema.setdefault("components", {}).setdefault("schemas", {}).update(BODY_SCHEMAS)
        return app.openapi_schema

    app.openapi = openapi


def streaming(events: AsyncIterator[str], deadline: float | None = None) -> StreamingResponse:
    """Server-sent events, unbuffered by proxies; see `ended_honestly` for `deadline`."""
    if deadline is not None:
        events = ended_honestly(events, deadline)
    return StreamingResponse(
        events,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
