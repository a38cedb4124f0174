"""Ingress deployment: the OpenAI-compatible HTTP surface (CPU).

Routes are thin: parse the body into its protocol model, call `OpenAIServing`
(models/openai/serving.py) or a backend handle, answer JSON or server-sent events. Every failure
leaves as OpenAI's error JSON with the right status (deployments/http.py).
"""

# No `from __future__ import annotations` here: FastAPI resolves the route methods' annotations
# at import, and on Serve's wrapped class methods postponed ones turn `Request` into a query field.
import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import PurePath
from typing import Annotated, Any

from fastapi import Depends, FastAPI, File, Form, Request, UploadFile
from fastapi.responses import JSONResponse, PlainTextResponse
from ray import serve

from deployments.files_api import build_files_router
from deployments.http import install_error_handlers, read_json, read_request, read_upload, streaming
from models.config import TandemConfig
from models.openai import admin
from models.openai.errors import OpenAIError
from models.openai.protocol import EmbeddingRequest, EmbeddingResponse
from models.openai.serving import Backends, OpenAIServing

app = FastAPI(title="Tandem", description="OpenAI-compatible API of Tandem")
install_error_handlers(app)


def check_api_key(request: Request) -> None:
    """When server.api_keys is set, every route but /healthz needs `Authorization: Bearer <key>`."""
    # request.app: Serve runs a copy of `app` in the replica; the Ingress sets its state.
    keys, header = request.app.state.api_keys, request.headers.get("authorization", "")
    if keys and (not header.startswith("Bearer ") or header[7:].strip() not in keys):
        raise OpenAIError("invalid or missing API key (send 'Authorization: Bearer <key>')", 401,
                          code="invalid_api_key")


AUTH = [Depends(check_api_key)]


@serve.deployment(name="Ingress")
@serve.ingress(app)
class Ingress:
    """OpenAI routes over the Router, Retriever and Generator deployments."""

    def __init__(self, config: dict, generator: Any, router: Any, retriever: Any):
        self.config = TandemConfig.model_validate(config)
        self.limit = self.config.server.max_request_bytes
        app.state.api_keys = list(self.config.server.api_keys)
        self.generator, self.router, self.retriever = generator, router, retriever
        self.serving = OpenAIServing.from_config(self.config, Backends(
            generate=self._generate, route=self.router.route.remote, search=self._search,
            adapters=self._adapters, vectors=self._vectors,
        ))
        self._adapter_cache: tuple[float, list[str]] = (0.0, [])
        app.include_router(build_files_router(lambda: self.retriever), dependencies=AUTH)

    async def _generate(self, request) -> AsyncIterator:
        gen = self.generator.options(stream=True).generate.remote(request)
        finished = False
        try:
            async for out in gen:
                finished = out.finished
                yield out
        finally:
            if not finished:
                gen.cancel()

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

    async def _add_vector(self, name: str, data: bytes, filename: str) -> dict:
        """Every Generator replica stores and applies the vector; one replica's answer is sent."""
        results = await self.generator.broadcast("add_vector", name, data, filename).results_async()
        return results[0]

    async def _answer(self, request: Request, handler) -> Any:
        body = await read_json(request, self.limit)
        result = await asyncio.wait_for(handler(body), timeout=self.config.server.request_timeout_s)
        return JSONResponse(result) if isinstance(result, dict) else streaming(result)

    @app.post("/v1/chat/completions", dependencies=AUTH)
    async def chat_completions(self, request: Request):
        return await self._answer(request, self.serving.chat)

    @app.post("/v1/completions", dependencies=AUTH)
    async def completions(self, request: Request):
        return await self._answer(request, self.serving.completions)

    @app.get("/v1/models", dependencies=AUTH)
    async def models(self):
        return JSONResponse(await self.serving.list_models())

    @app.post("/v1/load_lora_adapter", dependencies=AUTH)
    async def load_lora_adapter(self, request: Request):
        """vLLM's route: {"lora_name", "lora_path"}, the path under router.adapter_roots."""
        body = await read_request(request, admin.LoadLoraAdapterRequest, self.limit)
        path = body.checked_path(self.config.router.adapter_roots, self.config.engine.max_lora_rank)
        await self.generator.broadcast("load_adapter", body.lora_name, path).results_async()
        self._adapter_cache = (0.0, [])
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter", dependencies=AUTH)
    async def unload_lora_adapter(self, request: Request):
        """vLLM's route: {"lora_name"}."""
        body = await read_request(request, admin.UnloadLoraAdapterRequest, self.limit)
        await self.generator.broadcast("unload_adapter", body.lora_name).results_async()
        self._adapter_cache = (0.0, [])
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    @app.get("/v1/steering/vectors", dependencies=AUTH)
    async def list_vectors(self):
        return admin.SteeringVectorList(data=await self.generator.list_vectors.remote()).model_dump()

    @app.post("/v1/steering/vectors", dependencies=AUTH)
    async def upload_vector(self, file: Annotated[UploadFile, File()],
                            name: Annotated[str | None, Form()] = None):
        """Multipart upload: `file` (GGUF control vector or safetensors) and optional `name`."""
        data = await read_upload(file, self.limit * 64)
        filename = file.filename or "vector.gguf"
        return await self._add_vector(name or PurePath(filename).stem, data, filename)

    @app.post("/v1/steering/vectors/extract", dependencies=AUTH)
    async def extract_vector(self, request: Request):
        """{"name", "positive": [...], "negative": [...], "layers"?, "method"?: mean|pca}."""
        body = await read_request(request, admin.ExtractVectorRequest, self.limit)
        data = await self.generator.extract_vector.remote(
            body.name, body.positive, body.negative, body.layers, body.method)
        return await self._add_vector(body.name, data, f"{body.name}.gguf")

    @app.post("/v1/embeddings", dependencies=AUTH)
    async def embeddings(self, request: Request):
        """all-MiniLM-L6-v2 embeddings (384 dims, normalised) of `input` (string or strings)."""
        body = await read_request(request, EmbeddingRequest, self.limit)
        vectors = await self.retriever.embed.remote(body.input)
        return EmbeddingResponse.of(body.model or "all-MiniLM-L6-v2", vectors).model_dump()

    @app.get("/healthz")
    async def healthz(self):
        return {"status": "ok", "model": self.config.model.name}
