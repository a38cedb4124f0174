"""Ingress deployment: the OpenAI-compatible HTTP surface (CPU).

Routes are thin: parse the body into its protocol model, call `OpenAIServing`
(models/openai/serving.py) or a backend handle, answer JSON or server-sent events. Every failure
leaves as OpenAI's error JSON with the right status (deployments/http.py).
"""

# No `from __future__ import annotations` here: FastAPI resolves the route methods' annotations
# at import, and on Serve's wrapped class methods postponed ones turn `Request` into a query field.
import asyncio
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve

from deployments.admin_api import build_admin_router
from deployments.features_api import build_features_router
from deployments.files_api import build_files_router
from deployments.guard import MULTIPART_SLACK, GuardSettings, RequestGuard
from deployments.http import body_schema, install_error_handlers, read_json, read_request, streaming
from deployments.streams import GeneratorStreams
from deployments.telemetry import begin_request, metered
from deployments.traces_api import build_traces_router
from models.config import TandemConfig
from models.openai.errors import OpenAIError
from models.openai.protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from models.openai.responses import ResponsesRequest, ResponsesServing
from models.openai.serving import Backends, OpenAIServing

app = FastAPI(title="Tandem", description="OpenAI-compatible API of Tandem")
install_error_handlers(app)
# keys and body limits, before a route reads anything (deployments/guard.py); /docs and
# /openapi.json need a key too when keys are set
app.add_middleware(RequestGuard)


@serve.deployment(name="Ingress")
@serve.ingress(app)
class Ingress:
    """OpenAI routes over the Generator and, where the config needs them, the Router and the
    Retriever (None when left out)."""

    def __init__(self, config: dict, generator: Any, router: Any | None, retriever: Any | None):
        self.config = TandemConfig.model_validate(config)
        server = self.config.server
        self.limit = server.max_request_bytes
        # app: Serve runs a copy of the module's `app` in this replica; its state is ours
        uploads = {"/v1/files": self.config.retrieval.max_file_bytes + MULTIPART_SLACK,
                   "/v1/steering/vectors": self.limit * 64 + MULTIPART_SLACK}
        app.state.guard = GuardSettings(list(server.api_keys), list(server.admin_api_keys),
                                        self.limit, uploads)  # fmt: skip
        self.generator, self.retriever = generator, retriever
        self.streams = GeneratorStreams(generator, server.stream_interval_s, server.max_chunk_rate)
        self.serving = OpenAIServing.from_config(self.config, Backends(
            generate=metered(self.streams.generate, self.config.model.name),
            route=router.route.remote if router else None,
            search=self._search if retriever else None, adapters=self._adapters,
            vectors=self._vectors,
        ))  # fmt: skip
        self.responses = ResponsesServing(self.serving)
        self._adapter_cache: tuple[float, list[str]] = (0.0, [])
        app.include_router(build_files_router(
            self._retriever, self.config.retrieval.max_file_bytes, self.limit))
        app.include_router(build_admin_router(generator, router, self.config,
                                              self._forget_adapters))  # fmt: skip
        app.include_router(build_traces_router(generator))
        app.include_router(build_features_router(self.serving.activations, self.limit))

    def _retriever(self) -> Any:
        if self.retriever is None:
            raise OpenAIError("retrieval is off in this deployment (retrieval.enabled: false)",
                              404, code="retrieval_disabled")  # fmt: skip
        return self.retriever

    async def _search(self, query: str, store_ids: list[str], top_k: int, threshold: float | None,
                      filters: dict | None = None):  # fmt: skip
        return await self.retriever.search.remote(query, store_ids, top_k, threshold or 0.0,
                                                  filters)  # fmt: skip

    async def _adapters(self) -> list[str]:
        fetched_at, names = self._adapter_cache
        if time.monotonic() - fetched_at > 1.0:
            names = await self.generator.adapters.remote()
            self._adapter_cache = (time.monotonic(), names)
        return names

    def _forget_adapters(self) -> None:
        self._adapter_cache = (0.0, [])

    async def _vectors(self) -> list[str]:
        return [v["name"] for v in await self.generator.list_vectors.remote()]

    async def _answer(self, request: Request, handler) -> Any:
        """A generation route's answer: past request_timeout_s a 504, or for a stream an error
        event and [DONE]."""
        begin_request(request.headers.get("x-request-id"))  # Serve's proxy sets it if missing
        body = await read_json(request, self.limit)
        deadline = asyncio.get_running_loop().time() + self.config.server.request_timeout_s
        async with asyncio.timeout_at(deadline):
            result = await handler(body)
        return JSONResponse(result) if isinstance(result, dict) else streaming(result, deadline)

    @app.post("/v1/chat/completions", openapi_extra=body_schema(ChatCompletionRequest))
    async def chat_completions(self, request: Request):
        return await self._answer(request, self.serving.chat)

    @app.post("/v1/completions", openapi_extra=body_schema(CompletionRequest))
    async def completions(self, request: Request):
        return await self._answer(request, self.serving.completions)

    @app.post("/v1/responses", openapi_extra=body_schema(ResponsesRequest))
    async def responses(self, request: Request):
        return await self._answer(request, self.responses.create)

    @app.get("/v1/models")
    async def models(self):
        return JSONResponse(await self.serving.list_models())

    @app.get("/v1/models/{model_id:path}")
    async def model(self, model_id: str):
        return JSONResponse(await self.serving.retrieve_model(model_id))

    @app.post("/tokenize")
    async def tokenize(self, request: Request):
        return await self._answer(request, self.serving.tokenize)

    @app.post("/detokenize")
    async def detokenize(self, request: Request):
        return await self._answer(request, self.serving.detokenize)

    @app.post("/v1/embeddings", openapi_extra=body_schema(EmbeddingRequest))
    async def embeddings(self, request: Request):
        """all-MiniLM-L6-v2 embeddings (384 dims, normalised) of `input` (string or strings)."""
        body = await read_request(request, EmbeddingRequest, self.limit)
        vectors, tokens = await self._retriever().embed_counted.remote(body.input)
        return body.respond(vectors, tokens).model_dump()

    @app.api_route("/healthz", methods=["GET", "HEAD"])
    async def healthz(self):
        return {"status": "ok", "model": self.config.model.name}

    async def stats(self) -> dict:
        """This replica's counters: Ray messages from Generator streams, submit calls."""
        return {"generator_messages": self.streams.messages, "session": self.streams.session,
                "submit_calls": self.streams.submit_calls}  # fmt: skip
