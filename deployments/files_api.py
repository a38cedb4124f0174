"""The OpenAI Files and Vector Stores routes, as a FastAPI router the Ingress includes.

Implements what the `openai` SDK calls: files.create/list/retrieve/delete/content and
vector_stores.create/list/retrieve/delete/search, vector_stores.files.create/list/retrieve/
delete. Every route forwards to the Retriever through `retriever()` (a Ray Serve handle, or
models.retrieval.service.InProcessHandle without Ray). Bodies are the models of
models/openai/vector_stores.py; errors answer in OpenAI's shape
`{"error": {"message", "type", "param", "code"}}` with their status, in any app that includes
the router (OpenAIErrorRoute).
"""

from __future__ import annotations

import mimetypes
from collections.abc import Callable
from typing import Annotated, Any, Literal

from fastapi import APIRouter, File, Form, Request, UploadFile
from fastapi.responses import JSONResponse, Response

from deployments.file_batches_api import FilePage, build_file_batches_router
from deployments.http import OpenAIErrorRoute, body_schema, read_request, read_upload
from models.openai.vector_stores import VectorStoreCreate, VectorStoreFileCreate, VectorStoreSearch


def build_files_router(
    retriever: Callable[[], Any], max_upload_bytes: int | None = None,
    max_json_bytes: int = 1 << 20,
) -> APIRouter:
    """The /v1/files and /v1/vector_stores routes over the Retriever.

    `max_upload_bytes` stops reading an upload early (413); the Retriever checks its own limit
    (RetrievalConfig.max_file_bytes) either way. JSON bodies over `max_json_bytes` are a 413.
    """
    router = APIRouter(route_class=OpenAIErrorRoute)
    router.include_router(build_file_batches_router(retriever, max_json_bytes))

    @router.post("/v1/files")
    async def create_file(
        file: Annotated[UploadFile, File()], purpose: Annotated[str, Form()]
    ) -> Response:
        data = await read_upload(file, max_upload_bytes)
        pending = retriever().create_file.remote(file.filename or "upload", data, purpose)
        return JSONResponse(await pending)

    @router.get("/v1/files")
    async def list_files(
        limit: int = 10000,
        order: Literal["asc", "desc"] = "desc",
        after: str | None = None,
        purpose: str | None = None,
    ) -> Response:
        page = {"limit": limit, "order": order, "after": after, "purpose": purpose}
        return JSONResponse(await retriever().list_files.remote(**page))

    @router.get("/v1/files/{file_id}")
    async def retrieve_file(file_id: str) -> Response:
        return JSONResponse(await retriever().retrieve_file.remote(file_id))

    @router.delete("/v1/files/{file_id}")
    async def delete_file(file_id: str) -> Response:
        return JSONResponse(await retriever().delete_file.remote(file_id))

    @router.get("/v1/files/{file_id}/content")
    async def file_content(file_id: str) -> Response:
        filename, data = await retriever().file_content.remote(file_id)
        media_type = mimetypes.guess_type(filename)[0] or "application/octet-stream"
        return Response(content=data, media_type=media_type)

    @router.post("/v1/vector_stores", openapi_extra=body_schema(VectorStoreCreate))
    async def create_vector_store(request: Request) -> Response:
        body = await read_request(request, VectorStoreCreate, max_json_bytes)
        params = body.model_dump(exclude={"description"})
        return JSONResponse(await retriever().create_vector_store.remote(**params))

    @router.get("/v1/vector_stores")
    async def list_vector_stores(
        limit: int = 20, order: Literal["asc", "desc"] = "desc", after: str | None = None
    ) -> Response:
        page = {"limit": limit, "order": order, "after": after}
        return JSONResponse(await retriever().list_vector_stores.remote(**page))

    @router.get("/v1/vector_stores/{vector_store_id}")
    async def retrieve_vector_store(vector_store_id: str) -> Response:
        return JSONResponse(await retriever().retrieve_vector_store.remote(vector_store_id))

    @router.delete("/v1/vector_stores/{vector_store_id}")
    async def delete_vector_store(vector_store_id: str) -> Response:
        return JSONResponse(await retriever().delete_vector_store.remote(vector_store_id))

    @router.post("/v1/vector_stores/{vector_store_id}/files",
                 openapi_extra=body_schema(VectorStoreFileCreate))
    async def attach_file(vector_store_id: str, request: Request) -> Response:
        body = await read_request(request, VectorStoreFileCreate, max_json_bytes)
        return JSONResponse(await retriever().attach_file.remote(
            vector_store_id, body.file_id,
            chunking_strategy=body.chunking_strategy, attributes=body.attributes,
        ))

    @router.get("/v1/vector_stores/{vector_store_id}/files")
    async def list_vector_store_files(vector_store_id: str, page: FilePage) -> Response:
        pending = retriever().list_vector_store_files.remote(vector_store_id, **page)
        return JSONResponse(await pending)

    @router.get("/v1/vector_stores/{vector_store_id}/files/{file_id}")
    async def retrieve_vector_store_file(vector_store_id: str, file_id: str) -> Response:
        pending = retriever().retrieve_vector_store_file.remote(vector_store_id, file_id)
        return JSONResponse(await pending)

    @router.delete("/v1/vector_stores/{vector_store_id}/files/{file_id}")
    async def detach_file(vector_store_id: str, file_id: str) -> Response:
        return JSONResponse(await retriever().detach_file.remote(vector_store_id, file_id))

    @router.post("/v1/vector_stores/{vector_store_id}/search",
                 openapi_extra=body_schema(VectorStoreSearch))
    async def search_vector_store(vector_store_id: str, request: Request) -> Response:
        body = await read_request(request, VectorStoreSearch, max_json_bytes)
        body.refuse_unserved_options()
        return JSONResponse(await retriever().search_vector_store.remote(
            vector_store_id, query=body.query, max_num_results=body.max_num_results,
            score_threshold=body.ranking_options.score_threshold, filters=body.filters,
        ))

    return router
