"""Ingress deployment: the OpenAI-compatible HTTP surface (CPU).

Routes are thin: parse the body, call `OpenAIServing` (models/openai/serving.py) with Ray Serve
handles as its backends, and answer JSON or server-sent events. Every failure leaves as
OpenAI's error JSON with the right status.
"""

# No `from __future__ import annotations` here: FastAPI resolves the route methods' annotations
# at import, and on Serve's wrapped class methods postponed ones turn `Request` into a query field.
import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from pathlib import PurePath
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from deployments.streams import GeneratorStreams
from models.config import TandemConfig
from models.openai.errors import OpenAIError, to_openai_error
from models.openai.serving import Backends, OpenAIServing, ServingLimits

logger = logging.getLogger("ray.serve")

app = FastAPI(title="Tandem", description="OpenAI-compatible API of Tandem")


def error_response(exc: BaseException) -> JSONResponse:
    err = to_openai_error(exc)
    if err.status_code >= 500:
        logger.exception("request failed", exc_info=exc)
    return JSONResponse(err.to_dict(), status_code=err.status_code)


@app.exception_handler(OpenAIError)
async def _openai_error(_: Request, exc: OpenAIError) -> JSONResponse:
    return error_response(exc)


@app.exception_handler(RequestValidationError)
async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
    where = ".".join(str(p) for p in first["loc"] if p != "body")
    return error_response(OpenAIError(f"invalid value for '{where}': {first['msg']}", 400, param=where))


@app.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    return error_response(OpenAIError(str(exc.detail), exc.status_code))


@app.exception_handler(Exception)
async def _any_error(_: Request, exc: Exception) -> JSONResponse:
    return error_response(exc)


async def read_json(request: Request, limit: int) -> Any:
    """The request body as JSON: 413 over the limit, 400 when it is not JSON."""
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limit:
        raise OpenAIError(f"request body is {length} bytes; the limit is {limit}", 413)
    raw = await request.body()
    if len(raw) > limit:
        raise OpenAIError(f"request body is {len(raw)} bytes; the limit is {limit}", 413)
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise OpenAIError(f"the request body is not valid JSON: {exc}", 400) from None


def _field(body: Any, name: str) -> str:
    """A required non-empty string field of a JSON body."""
    value = body.get(name) if isinstance(body, dict) else None
    if not isinstance(value, str) or not value.strip():
        raise OpenAIError(f"'{name}' is required and must be a non-empty string", param=name)
    return value.strip()


def _streaming(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(
        events,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@serve.deployment(name="Ingress")
@serve.ingress(app)
class Ingress:
    """OpenAI routes over the Router, Retriever and Generator deployments."""

    def __init__(self, config: dict, generator: Any, router: Any, retriever: Any):
        from transformers import AutoConfig, AutoTokenizer

        from models.builtin import resolve_source

        self.config = TandemConfig.model_validate(config)
        self.generator = generator
        self.streams = GeneratorStreams(generator)
        self.router = router
        self.retriever = retriever
        paths = resolve_source(self.config.model.source)
        self.tokenizer = AutoTokenizer.from_pretrained(paths.big)
        model_cfg = AutoConfig.from_pretrained(paths.big)
        max_len = self.config.engine.max_model_len or model_cfg.max_position_embeddings
        policies = {p.name: dict(p.params) for p in self.config.steering.policies}
        self.serving = OpenAIServing(
            model_name=self.config.model.name,
            tokenizer=self.tokenizer,
            backends=Backends(
                generate=self.streams.generate,
                route=self._route,
                search=self._search,
                adapters=self._adapters,
                vectors=self._vectors,
            ),
            limits=ServingLimits(
                max_model_len=max_len,
                vocab_size=model_cfg.vocab_size,
                max_n=self.config.server.max_n,
                default_max_tokens=self.config.server.default_max_tokens,
                default_vector_store_ids=self.config.retrieval.default_vector_store_ids,
                default_top_k=self.config.retrieval.default_top_k,
                policies=policies,
                default_steering_mode=self.config.steering.default_mode,
                steering_timeout_s=self.config.steering.timeout_s,
            ),
        )
        self._adapter_cache: tuple[float, list[str]] = (0.0, [])
        self._include_files_api()

    def _include_files_api(self) -> None:
        from fastapi import Depends

        from deployments.files_api import build_files_router

        app.include_router(build_files_router(lambda: self.retriever),
                           dependencies=[Depends(self._check_auth)])

    # ---- backends for the serving layer -------------------------------------------------

    async def _route(self, prompt: str) -> dict:
        return await self.router.route.remote(prompt)

    async def _search(self, query: str, store_ids: list[str], top_k: int, threshold: float | None):
        if threshold is None:
            return await self.retriever.search.remote(query, store_ids, top_k)
        return await self.retriever.search.remote(query, store_ids, top_k, threshold)

    async def _adapters(self) -> list[str]:
        fetched_at, names = self._adapter_cache
        if time.monotonic() - fetched_at > 1.0:
            names = await self.generator.adapters.remote()
            self._adapter_cache = (time.monotonic(), names)
        return names

    async def _vectors(self) -> list[str]:
        return [v["name"] for v in await self.generator.list_vectors.remote()]

    def _check_auth(self, request: Request) -> None:
        keys = self.config.server.api_keys
        if not keys:
            return
        header = request.headers.get("authorization", "")
        if not header.startswith("Bearer ") or header.removeprefix("Bearer ").strip() not in keys:
            raise OpenAIError("invalid or missing API key (send 'Authorization: Bearer <key>')", 401,
                              code="invalid_api_key")

    async def _answer(self, request: Request, handler) -> Any:
        self._check_auth(request)
        body = await read_json(request, self.config.server.max_request_bytes)
        result = await asyncio.wait_for(handler(body), timeout=self.config.server.request_timeout_s)
        if isinstance(result, dict):
            return JSONResponse(result)
        return _streaming(result)

    # ---- routes -----------------------------------------------------------------------------

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._answer(request, self.serving.chat)

    @app.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._answer(request, self.serving.completions)

    @app.get("/v1/models")
    async def models(self, request: Request):
        self._check_auth(request)
        return JSONResponse(await self.serving.list_models())

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(self, request: Request):
        """vLLM's route: {"lora_name", "lora_path"}; the path must lie under router.adapter_roots."""
        from models.routing.adapter_paths import inspect_adapter_dir, resolve_adapter_path

        self._check_auth(request)
        body = await read_json(request, self.config.server.max_request_bytes)
        name, path = _field(body, "lora_name"), _field(body, "lora_path")
        if ":" in name or name in ("auto", "base"):
            raise OpenAIError(f"'{name}' cannot name an adapter (reserved, or contains ':')",
                              param="lora_name")
        resolved = str(resolve_adapter_path(path, self.config.router.adapter_roots))
        inspect_adapter_dir(resolved, max_rank=self.config.engine.max_lora_rank)
        await self.generator.broadcast("load_adapter", name, resolved).results_async()
        self._adapter_cache = (0.0, [])
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(self, request: Request):
        """vLLM's route: {"lora_name"}."""
        self._check_auth(request)
        body = await read_json(request, self.config.server.max_request_bytes)
        name = _field(body, "lora_name")
        await self.generator.broadcast("unload_adapter", name).results_async()
        self._adapter_cache = (0.0, [])
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")

    @app.get("/v1/steering/vectors")
    async def list_vectors(self, request: Request):
        self._check_auth(request)
        return {"object": "list", "data": await self.generator.list_vectors.remote()}

    @app.post("/v1/steering/vectors")
    async def upload_vector(self, request: Request):
        """Multipart upload: `file` (GGUF control vector or safetensors) and optional `name`."""
        self._check_auth(request)
        form = await request.form()
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise OpenAIError("send the vector as a multipart field named 'file'", param="file")
        data = await upload.read()
        if len(data) > self.config.server.max_request_bytes * 64:
            raise OpenAIError(f"vector file is {len(data)} bytes; too large", 413)
        name = str(form.get("name") or PurePath(upload.filename or "vector").stem)
        results = await self.generator.broadcast(
            "add_vector", name, data, upload.filename or "vector.gguf").results_async()
        return results[0]

    @app.post("/v1/steering/vectors/extract")
    async def extract_vector(self, request: Request):
        """{"name", "positive": [...], "negative": [...], "layers"?, "method"?: mean|pca}."""
        self._check_auth(request)
        body = await read_json(request, self.config.server.max_request_bytes)
        name = _field(body, "name")
        pos, neg = body.get("positive"), body.get("negative")
        if not (isinstance(pos, list) and isinstance(neg, list) and pos and len(pos) == len(neg)
                and all(isinstance(t, str) and t for t in pos + neg)):
            raise OpenAIError("'positive' and 'negative' must be equally long, non-empty lists "
                              "of non-empty strings (contrastive pairs)", param="positive")
        method = body.get("method", "mean")
        if method not in ("mean", "pca"):
            raise OpenAIError("method must be 'mean' or 'pca'", param="method")
        layers = body.get("layers")
        if layers is not None and not (isinstance(layers, list) and all(isinstance(x, int) for x in layers)):
            raise OpenAIError("layers must be a list of integers", param="layers")
        data = await self.generator.extract_vector.remote(name, pos, neg, layers, method)
        results = await self.generator.broadcast("add_vector", name, data, f"{name}.gguf").results_async()
        return results[0]

    @app.post("/v1/embeddings")
    async def embeddings(self, request: Request):
        """all-MiniLM-L6-v2 embeddings (384 dims, normalised) of `input` (string or strings)."""
        self._check_auth(request)
        body = await read_json(request, self.config.server.max_request_bytes)
        texts = body.get("input")
        if isinstance(texts, str):
            texts = [texts]
        if not (isinstance(texts, list) and texts and all(isinstance(t, str) and t for t in texts)):
            raise OpenAIError("'input' must be a non-empty string or list of non-empty strings",
                              param="input")
        if len(texts) > 2048:
            raise OpenAIError("at most 2048 inputs per request", param="input")
        vectors = await self.retriever.embed.remote(texts)
        return {
            "object": "list",
            "model": body.get("model") or "all-MiniLM-L6-v2",
            "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)],
            "usage": {"prompt_tokens": 0, "total_tokens": 0},
        }

    @app.get("/healthz")
    async def healthz(self):
        return {"status": "ok", "model": self.config.model.name}
