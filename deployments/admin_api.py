"""Tandem's admin routes (LoRA adapters, steering vectors), as a FastAPI router the Ingress
includes. Each forwards to the Generator deployment: a change goes to every replica
(`broadcast`), so all of them serve the same adapters and vectors."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import PurePath
from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Request, UploadFile
from fastapi.responses import PlainTextResponse

from deployments.http import OpenAIErrorRoute, read_request, read_upload
from models.config import TandemConfig
from models.openai import admin


def build_admin_router(
    generator: Any, config: TandemConfig, adapters_changed: Callable[[], None]
) -> APIRouter:
    """The adapter and steering-vector routes over the Generator handle; `adapters_changed`
    is called after an adapter was loaded or unloaded."""
    router = APIRouter(route_class=OpenAIErrorRoute)
    limit = config.server.max_request_bytes

    async def add_vector(name: str, data: bytes, filename: str) -> dict:
        """Every replica stores and applies the vector; one replica's answer is sent."""
        return (await generator.broadcast("add_vector", name, data, filename).results_async())[0]

    @router.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: Request):
        """vLLM's route: {"lora_name", "lora_path"}, the path under router.adapter_roots."""
        body = await read_request(request, admin.LoadLoraAdapterRequest, limit)
        path = body.checked_path(config.router.adapter_roots, config.engine.max_lora_rank)
        await generator.broadcast("load_adapter", body.lora_name, path).results_async()
        adapters_changed()
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @router.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: Request):
        """vLLM's route: {"lora_name"}."""
        body = await read_request(request, admin.UnloadLoraAdapterRequest, limit)
        await generator.broadcast("unload_adapter", body.lora_name).results_async()
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

    @router.post("/v1/steering/vectors/extract")
    async def extract_vector(request: Request):
        """{"name", "positive": [...], "negative": [...], "layers"?, "method"?: mean|pca}."""
        body = await read_request(request, admin.ExtractVectorRequest, limit)
        data = await generator.extract_vector.remote(
            body.name, body.positive, body.negative, body.layers, body.method)
        return await add_vector(body.name, data, f"{body.name}.gguf")

    return router
