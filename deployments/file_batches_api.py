"""Vector store file batches, as a FastAPI router the Files router includes: what the `openai`
SDK's `vector_stores.file_batches` calls (create, retrieve, cancel, list_files, and through them
create_and_poll / upload_and_poll). Each route forwards to the Retriever's `file_batch`
(models/retrieval/batches.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from deployments.http import OpenAIErrorRoute, body_schema, read_request
from models.openai.vector_stores import VectorStoreFileBatchCreate

FileStatus = Literal["in_progress", "completed", "failed", "cancelled"]


def file_page(limit: int = 20, order: Literal["asc", "desc"] = "desc", after: str | None = None,
              filter: FileStatus | None = None) -> dict[str, Any]:  # fmt: skip
    """The query of a file listing (a vector store's or a batch's): a page, by status."""
    return {"limit": limit, "order": order, "after": after, "status": filter}


FilePage = Annotated[dict[str, Any], Depends(file_page)]


def build_file_batches_router(retriever: Callable[[], Any], max_json_bytes: int) -> APIRouter:
    router = APIRouter(route_class=OpenAIErrorRoute)
    prefix = "/v1/vector_stores/{vector_store_id}/file_batches"

    @router.post(prefix, openapi_extra=body_schema(VectorStoreFileBatchCreate))
    async def create_file_batch(vector_store_id: str, request: Request) -> Response:
        body = await read_request(request, VectorStoreFileBatchCreate, max_json_bytes)
        pending = retriever().file_batch.remote("create", vector_store_id, body.file_list())
        return JSONResponse(await pending)

    @router.get(prefix + "/{batch_id}")
    async def retrieve_file_batch(vector_store_id: str, batch_id: str) -> Response:
        pending = retriever().file_batch.remote("retrieve", vector_store_id, batch_id)
        return JSONResponse(await pending)

    @router.post(prefix + "/{batch_id}/cancel")
    async def cancel_file_batch(vector_store_id: str, batch_id: str) -> Response:
        pending = retriever().file_batch.remote("cancel", vector_store_id, batch_id)
        return JSONResponse(await pending)

    @router.get(prefix + "/{batch_id}/files")
    async def list_file_batch_files(vector_store_id: str, batch_id: str, page: FilePage) -> Response:
        pending = retriever().file_batch.remote("list_files", vector_store_id, batch_id, **page)
        return JSONResponse(await pending)

    return router
