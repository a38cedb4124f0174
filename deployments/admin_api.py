"""Tandem's admin routes (LoRA adapters, steering vectors), as a FastAPI router the Ingress
includes. Each forwards to the Generator deployment: a change goes to every replica
(`broadcast`), so all of them serve the same adapters and vectors. An adapter loaded here is
recorded on disk (models/routing/registry.py) for the replicas to come, and taught to the
Router when it comes with examples. What the config names (adapters, vectors) cannot be
unloaded or overwritten here (409). The admin key tier guards these routes (guard.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import PurePath
from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Request, UploadFile
from fastapi.responses import PlainTextResponse

from deployments.http import OpenAIErrorRoute, body_schema, read_request, read_upload
from models.config import TandemConfig
from models.openai import admin
from models.openai.errors import OpenAIError
from models.protocol.errors import VectorNotFoundError
from models.routing.config import AdapterConfig
from models.routing.registry import AdapterRegistry


def build_admin_router(
    generator: Any, adapter_router: Any | None, config: TandemConfig,
    adapters_changed: Callable[[], None],
) -> APIRouter:
    """The adapter and steering-vector routes over the Generator handle (and the Router's,
    None when the app has none); `adapters_changed` is called after an adapter was loaded or
    unloaded."""
    router = APIRouter(route_class=OpenAIErrorRoute)
    limit = config.server.max_request_bytes
    registry = AdapterRegistry(config.server.state_dir)
    configured_adapters = {a.name for a in config.adapters}
    configured_vectors = {v.name for v in config.steering.vectors}

    def refuse_configured(name: str, configured: set[str], what: str, param: str) -> None:
        if name in configured:
            raise OpenAIError(f"{what} '{name}' comes from the server's config; it cannot be "
                              "changed through the API (use another name)", 409, param=param,
                              code=f"configured_{what.split()[-1]}")  # fmt: skip

    async def add_vector(name: str, data: bytes, filename: str) -> dict:
        """Every replica stores and applies the vector; one replica's answer is sent."""
        refuse_configured(name, configured_vectors, "steering vector", "name")
        return (await generator.broadcast("add_vector", name, data, filename).results_async())[0]

    async def teach_router(method: str, *args: Any) -> None:
        if adapter_router is not None:
            await adapter_router.broadcast(method, *args).results_async()

    @router.post("/v1/load_lora_adapter", openapi_extra=body_schema(admin.LoadLoraAdapterRequest))
    async def load_lora_adapter(request: Request):
        """vLLM's route: {"lora_name", "lora_path"}, the path under router.adapter_roots."""
        body = await read_request(request, admin.LoadLoraAdapterRequest, limit)
        refuse_configured(body.lora_name, configured_adapters, "adapter", "lora_name")
        path = body.checked_path(config.router.adapter_roots, config.engine.max_lora_rank)
        await generator.broadcast("load_adapter", body.lora_name, path).results_async()
        adapter = AdapterConfig(name=body.lora_name, path=path, description=body.description,
                                examples=body.examples)  # fmt: skip
        registry.record(adapter)
        await teach_router("add_adapter", adapter.model_dump())
        adapters_changed()
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @router.post("/v1/unload_lora_adapter",
                 openapi_extra=body_schema(admin.UnloadLoraAdapterRequest))
    async def unload_lora_adapter(request: Request):
        """vLLM's route: {"lora_name"}."""
        body = await read_request(request, admin.UnloadLoraAdapterRequest, limit)
        refuse_configured(body.lora_name, configured_adapters, "adapter", "lora_name")
        registry.forget(body.lora_name)  # first: a recorded adapter that failed to load goes too
        await generator.broadcast("unload_adapter", body.lora_name).results_async()
        await teach_router("remove_adapter", body.lora_name)
        adapters_changed()
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    @router.get("/v1/steering/vectors")
    async def list_vectors():
        return admin.SteeringVectorList(data=await generator.list_vectors.remote()).model_dump()

    @router.post("/v1/steering/vectors")
    async def upload_vector(file: Annotated[UploadFile, File()],
                            name: Annotated[str | None, Form()] = None):
        """Multipart upload: `file` (GGUF control vector or safetensors) and optional `name`."""
        data = await read_upload(file, limit * 64)
        filename = file.filename or "vector.gguf"
        return await add_vector(name or PurePath(filename).stem, data, filename)

    @router.delete("/v1/steering/vectors/{name}")
    async def delete_vector(name: str):
        """Every replica forgets the vector (configured ones stay: 409)."""
        refuse_configured(name, configured_vectors, "steering vector", "name")
        known = [v["name"] for v in await generator.list_vectors.remote()]
        if name not in known:
            raise VectorNotFoundError.naming(name, known, param="name")
        await generator.broadcast("remove_vector", name).results_async()
        return {"id": name, "object": "steering.vector.deleted", "deleted": True}

    @router.post("/v1/steering/vectors/extract",
                 openapi_extra=body_schema(admin.ExtractVectorRequest))
    async def extract_vector(request: Request):
        """{"name", "positive": [...], "negative": [...], "layers"?, "method"?: mean|pca}."""
        body = await read_request(request, admin.ExtractVectorRequest, limit)
        refuse_configured(body.name, configured_vectors, "steering vector", "name")
        data = await generator.extract_vector.remote(
            body.name, body.positive, body.negative, body.layers, body.method)
        return await add_vector(body.name, data, f"{body.name}.gguf")

    return router
