"""The Retriever deployment (CPU): a thin Ray Serve shell over models.retrieval.RetrieverService,
with the built-in world documents (models.builtin.world) handed in.

Concurrent `search` calls are batched (one embedder call and one FAISS search per store for the
batch); everything blocking runs in a worker thread so the replica keeps accepting requests.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Sequence
from typing import Any

from ray import serve

from deployments.telemetry import record_ingest, record_search, record_upload
from models.builtin.world import world_documents
from models.retrieval.config import RetrievalConfig
from models.retrieval.errors import RetrievalError
from models.retrieval.records import SearchHit
from models.retrieval.search import SearchRequest
from models.retrieval.service import RetrieverService

SEARCH_BATCH_SIZE = 32
SEARCH_BATCH_WAIT_S = 0.003


def set_threads(threads: int) -> int:
    """Threads for torch and FAISS: `threads`, else OMP_NUM_THREADS (Ray sets it), else 1."""
    n = threads or int(os.environ.get("OMP_NUM_THREADS") or 1)
    n = max(1, min(n, os.cpu_count() or 1))
    import faiss
    import torch

    torch.set_num_threads(n)
    faiss.omp_set_num_threads(n)
    return n


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=64)
class Retriever:
    """Documents, vector stores and search; the constructor takes RetrievalConfig as a dict."""

    def __init__(self, config: dict[str, Any] | None = None):
        retrieval = RetrievalConfig.model_validate(config or {})
        self.threads = set_threads(retrieval.threads)
        self.service = RetrieverService(retrieval, builtin_documents=world_documents)

    async def search(
        self,
        query: str,
        vector_store_ids: Sequence[str] | None = None,
        top_k: int | None = None,
        score_threshold: float = 0.0,
        filters: dict | None = None,
    ) -> list[SearchHit]:
        """Top chunks for a prompt (default stores and top_k from the config when not given)."""
        started = time.perf_counter()
        request = self.service.search_request(query, vector_store_ids, top_k, score_threshold,
                                              filters)  # fmt: skip
        result = await self._search_batched(request)
        record_search(result, started)
        if isinstance(result, RetrievalError):
            raise result
        return result

    @serve.batch(max_batch_size=SEARCH_BATCH_SIZE, batch_wait_timeout_s=SEARCH_BATCH_WAIT_S)
    async def _search_batched(
        self, requests: list[SearchRequest]
    ) -> list[list[SearchHit] | RetrievalError]:
        return await asyncio.to_thread(self.service.search_batch_settled, requests)

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """all-MiniLM-L6-v2 embeddings (normalised, 384 floats each), for POST /v1/embeddings."""
        return await asyncio.to_thread(self.service.embed, texts)

    async def embed_counted(self, texts: Sequence[str]) -> tuple[list[list[float]], int]:
        """`embed` and the tokens read, for POST /v1/embeddings' usage."""
        return await asyncio.to_thread(self.service.embed_counted, texts)

    async def create_file(self, filename: str, data: bytes, purpose: str = "assistants") -> dict:
        record_upload(len(data))
        return await asyncio.to_thread(self.service.create_file, filename, data, purpose)

    async def list_files(self, **page: Any) -> dict:
        return await asyncio.to_thread(self.service.list_files, **page)

    async def retrieve_file(self, file_id: str) -> dict:
        return await asyncio.to_thread(self.service.retrieve_file, file_id)

    async def file_content(self, file_id: str) -> tuple[str, bytes]:
        return await asyncio.to_thread(self.service.file_content, file_id)

    async def delete_file(self, file_id: str) -> dict:
        return await asyncio.to_thread(self.service.delete_file, file_id)

    async def create_vector_store(self, **params: Any) -> dict:
        created = await asyncio.to_thread(self.service.create_vector_store, **params)
        record_ingest(self.service.store.chunk_count(created["id"]))
        return created

    async def list_vector_stores(self, **page: Any) -> dict:
        return await asyncio.to_thread(self.service.list_vector_stores, **page)

    async def retrieve_vector_store(self, vector_store_id: str) -> dict:
        return await asyncio.to_thread(self.service.retrieve_vector_store, vector_store_id)

    async def delete_vector_store(self, vector_store_id: str) -> dict:
        return await asyncio.to_thread(self.service.delete_vector_store, vector_store_id)

    async def attach_file(self, vector_store_id: str, file_id: str, **params: Any) -> dict:
        done = await asyncio.to_thread(self.service.attach_file, vector_store_id, file_id, **params)
        attached = self.service.store.retrieve_vector_store_file(vector_store_id, file_id)
        record_ingest(attached.chunk_count)
        return done

    async def list_vector_store_files(self, vector_store_id: str, **page: Any) -> dict:
        return await asyncio.to_thread(
            self.service.list_vector_store_files, vector_store_id, **page
        )

    async def retrieve_vector_store_file(self, vector_store_id: str, file_id: str) -> dict:
        return await asyncio.to_thread(
            self.service.retrieve_vector_store_file, vector_store_id, file_id
        )

    async def detach_file(self, vector_store_id: str, file_id: str) -> dict:
        return await asyncio.to_thread(self.service.detach_file, vector_store_id, file_id)

    async def search_vector_store(self, vector_store_id: str, **params: Any) -> dict:
        return await asyncio.to_thread(self.service.search_vector_store, vector_store_id, **params)

    async def file_batch(self, operation: str, vector_store_id: str, *args: Any, **kw: Any) -> dict:
        """create / retrieve / cancel / list_files of vector store file batches."""
        return await asyncio.to_thread(self.service.file_batch, operation, vector_store_id,
                                       *args, **kw)  # fmt: skip

    def check_health(self) -> None:
        """Ray Serve's health probe: the database answers."""
        self.service.store.list_vector_stores()
