"""The OpenAI Files and Vector Stores routes, as a FastAPI router the Ingress includes.

Implements what the `openai` SDK calls: files.create/list/retrieve/delete/content and
vector_stores.create/list/retrieve/delete/search, vector_stores.files.create/list/retrieve/
delete. Every route forwards to the Retriever through `get_retriever_handle()` (a Ray Serve
handle, or models.retrieval.service.InProcessHandle without Ray). Errors answer in OpenAI's
shape `{"error": {"message", "type", "param", "code"}}` with their status.
"""

from __future__ import annotations

import mimetypes
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Literal

from fastapi import APIRouter, File, Form, Request, UploadFile
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from models.openai.errors import OpenAIError, to_openai_error

UPLOAD_READ_BYTES = 1 << 20


class VectorStoreCreate(BaseModel):
    """Body of POST /v1/vector_stores."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = None
    file_ids: list[str] = Field(default_factory=list)
    chunking_strategy: dict[str, Any] | None = None
    metadata: dict[str, str] | None = None
    description: str | None = None


class VectorStoreFileCreate(BaseModel):
    """Body of POST /v1/vector_stores/{id}/files."""

    model_config = ConfigDict(extra="forbid")

    file_id: str
    chunking_strategy: dict[str, Any] | None = None
    attributes: dict[str, str | float | bool] | None = None


class RankingOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ranker: str | None = None
    score_threshold: float = Field(0.0, ge=0.0, le=1.0)


class VectorStoreSearch(BaseModel):
    """Body of POST /v1/vector_stores/{id}/search (filters and query rewriting are not served)."""

    model_config = ConfigDict(extra="forbid")

    query: str | list[str]
    max_num_results: int = Field(10, ge=1, le=50)
    ranking_options: RankingOptions = Field(default_factory=RankingOptions)
    rewrite_query: bool = False
    filters: dict[str, Any] | None = None


def build_files_router(
    get_retriever_handle: Callable[[], Any], max_upload_bytes: int | None = None
) -> APIRouter:
    """The /v1/files and /v1/vector_stores routes over the Retriever.

    `max_upload_bytes` stops reading an upload early (413); the Retriever checks its own limit
    (RetrievalConfig.max_file_bytes) either way.
    """
    router = APIRouter()

    @router.post("/v1/files")
    async def create_file(
        file: Annotated[UploadFile, File()], purpose: Annotated[str, Form()]
    ) -> Response:
        try:
            data = await _read_upload(file, max_upload_bytes)
        except OpenAIError as exc:
            return _error(exc)
        filename = file.filename or "upload"
        return await _answer(get_retriever_handle().create_file.remote(filename, data, purpose))

    @router.get("/v1/files")
    async def list_files(
        limit: int = 10000,
        order: Literal["asc", "desc"] = "desc",
        after: str | None = None,
        purpose: str | None = None,
    ) -> Response:
        page = {"limit": limit, "order": order, "after": after, "purpose": purpose}
        return await _answer(get_retriever_handle().list_files.remote(**page))

    @router.get("/v1/files/{file_id}")
    async def retrieve_file(file_id: str) -> Response:
        return await _answer(get_retriever_handle().retrieve_file.remote(file_id))

    @router.delete("/v1/files/{file_id}")
    async def delete_file(file_id: str) -> Response:
        return await _answer(get_retriever_handle().delete_file.remote(file_id))

    @router.get("/v1/files/{file_id}/content")
    async def file_content(file_id: str) -> Response:
        try:
            filename, data = await get_retriever_handle().file_content.remote(file_id)
        except Exception as exc:
            return _error(exc)
        media_type = mimetypes.guess_type(filename)[0] or "application/octet-stream"
        return Response(content=data, media_type=media_type)

    @router.post("/v1/vector_stores")
    async def create_vector_store(request: Request) -> Response:
        try:
            body = await _body(request, VectorStoreCreate)
        except OpenAIError as exc:
            return _error(exc)
        params = body.model_dump(exclude={"description"})
        return await _answer(get_retriever_handle().create_vector_store.remote(**params))

    @router.get("/v1/vector_stores")
    async def list_vector_stores(
        limit: int = 20, order: Literal["asc", "desc"] = "desc", after: str | None = None
    ) -> Response:
        page = {"limit": limit, "order": order, "after": after}
        return await _answer(get_retriever_handle().list_vector_stores.remote(**page))

    @router.get("/v1/vector_stores/{vector_store_id}")
    async def retrieve_vector_store(vector_store_id: str) -> Response:
        return await _answer(get_retriever_handle().retrieve_vector_store.remote(vector_store_id))

    @router.delete("/v1/vector_stores/{vector_store_id}")
    async def delete_vector_store(vector_store_id: str) -> Response:
        return await _answer(get_retriever_handle().delete_vector_store.remote(vector_store_id))

    @router.post("/v1/vector_stores/{vector_store_id}/files")
    async def attach_file(vector_store_id: str, request: Request) -> Response:
        try:
            body = await _body(request, VectorStoreFileCreate)
        except OpenAIError as exc:
            return _error(exc)
        return await _answer(
            get_retriever_handle().attach_file.remote(
                vector_store_id,
                body.file_id,
                chunking_strategy=body.chunking_strategy,
                attributes=body.attributes,
            )
        )

    @router.get("/v1/vector_stores/{vector_store_id}/files")
    async def list_vector_store_files(
        vector_store_id: str,
        limit: int = 20,
        order: Literal["asc", "desc"] = "desc",
        after: str | None = None,
        filter: Literal["in_progress", "completed", "failed", "cancelled"] | None = None,
    ) -> Response:
        page = {"limit": limit, "order": order, "after": after, "status": filter}
        handle = get_retriever_handle()
        return await _answer(handle.list_vector_store_files.remote(vector_store_id, **page))

    @router.get("/v1/vector_stores/{vector_store_id}/files/{file_id}")
    async def retrieve_vector_store_file(vector_store_id: str, file_id: str) -> Response:
        handle = get_retriever_handle()
        return await _answer(handle.retrieve_vector_store_file.remote(vector_store_id, file_id))

    @router.delete("/v1/vector_stores/{vector_store_id}/files/{file_id}")
    async def detach_file(vector_store_id: str, file_id: str) -> Response:
        return await _answer(get_retriever_handle().detach_file.remote(vector_store_id, file_id))

    @router.post("/v1/vector_stores/{vector_store_id}/search")
    async def search_vector_store(vector_store_id: str, request: Request) -> Response:
        try:
            body = await _body(request, VectorStoreSearch)
            _refuse_unserved_search_options(body)
        except OpenAIError as exc:
            return _error(exc)
        return await _answer(
            get_retriever_handle().search_vector_store.remote(
                vector_store_id,
                query=body.query,
                max_num_results=body.max_num_results,
                score_threshold=body.ranking_options.score_threshold,
            )
        )

    return router


async def _answer(pending: Awaitable[Any]) -> Response:
    """The handle call's result as JSON, or its error in OpenAI's shape."""
    try:
        return JSONResponse(await pending)
    except Exception as exc:
        return _error(exc)


def _error(exc: BaseException) -> JSONResponse:
    err = to_openai_error(exc)
    return JSONResponse(err.to_dict(), status_code=err.status_code)


async def _body(request: Request, model: type[BaseModel]) -> Any:
    """The JSON body validated against `model`; problems become a 400 naming the field."""
    try:
        payload = await request.json()
    except ValueError:
        raise OpenAIError("the request body is not valid JSON", 400, code="invalid_json") from None
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        raise OpenAIError(
            f"{param}: {first['msg']}", 400, param=param, code="invalid_value"
        ) from None


def _refuse_unserved_search_options(body: VectorStoreSearch) -> None:
    if body.filters:
        raise OpenAIError(
            "attribute filters are not supported by this server; search without 'filters'",
            400,
            param="filters",
            code="unsupported_parameter",
        )
    if body.rewrite_query:
        raise OpenAIError(
            "query rewriting is not supported by this server; set rewrite_query to false",
            400,
            param="rewrite_query",
            code="unsupported_parameter",
        )


async def _read_upload(file: UploadFile, limit: int | None) -> bytes:
    """The upload's bytes, refusing (413) as soon as they pass `limit`."""
    parts, size = [], 0
    while chunk := await file.read(UPLOAD_READ_BYTES):
        size += len(chunk)
        if limit is not None and size > limit:
            raise OpenAIError(
                f"'{file.filename}' is over the upload limit of {limit} bytes",
                413,
                param="file",
                code="file_too_large",
            )
        parts.append(chunk)
    return b"".join(parts)
