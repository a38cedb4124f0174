"""What the Retriever deployment serves, without Ray: search for the Ingress, and the OpenAI
Files / Vector Stores operations answered as the dicts the `openai` SDK parses.

`InProcessHandle` calls a RetrieverService the way a Ray Serve handle calls the deployment
(`await handle.method.remote(...)`), so the Files API router runs on it without Ray.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from models.retrieval import batches
from models.retrieval.config import RetrievalConfig
from models.retrieval.errors import InvalidRequest, RetrievalError
from models.retrieval.records import SearchHit
from models.retrieval.search import SearchRequest
from models.retrieval.store import DocumentStore

log = logging.getLogger(__name__)

BUILTIN_STORE_ID = "world"
LIST_LIMIT_MAX = 100


class RetrieverService:
    """A DocumentStore configured from RetrievalConfig, plus the built-in documents.

    `builtin_documents` produces the documents of the built-in store "world" (see
    `ensure_builtin_store`); the application passes it in, so retrieval imports no source of
    documents. It is called on start when the config's `builtin_documents` is on.
    """

    def __init__(
        self,
        config: RetrievalConfig | dict[str, Any] | None = None,
        embedder=None,
        builtin_documents: Callable[[], Iterable[Any]] | None = None,
    ):
        self.config = RetrievalConfig.model_validate(config or {})
        if embedder is None:
            from models.embedding import shared_embedder

            embedder = shared_embedder()
        self.store = DocumentStore.from_config(self.config, embedder)
        if self.config.builtin_documents:
            if builtin_documents is None:
                log.info("no built-in documents were given; no built-in store")
            else:
                ensure_builtin_store(self.store, list(builtin_documents()))

    # For the Ingress

    def search(
        self,
        query: str,
        vector_store_ids: Sequence[str] | None = None,
        top_k: int | None = None,
        score_threshold: float = 0.0,
    ) -> list[SearchHit]:
        """Top chunks for a prompt; with no store ids, RetrievalConfig.default_vector_store_ids."""
        return self.search_batch(
            [self.search_request(query, vector_store_ids, top_k, score_threshold)]
        )[0]

    def search_request(
        self,
        query: str,
        vector_store_ids: Sequence[str] | None = None,
        top_k: int | None = None,
        score_threshold: float = 0.0,
        filters: dict | None = None,
    ) -> SearchRequest:
        """A search with the config's defaults filled in."""
        store_ids = list(vector_store_ids or self.config.default_vector_store_ids)
        return SearchRequest(store_ids, query, top_k or self.config.default_top_k, score_threshold,
                             filters)  # fmt: skip

    def search_batch(self, requests: Sequence[SearchRequest]) -> list[list[SearchHit]]:
        """Several searches in one embedder call; requests naming no store get no hits."""
        results: list[list[SearchHit]] = [[] for _ in requests]
        live = [i for i, r in enumerate(requests) if r.vector_store_ids]
        found = self.store.search_many([requests[i] for i in live])
        for i, hits in zip(live, found, strict=True):
            results[i] = hits
        return results

    def search_batch_settled(
        self, requests: Sequence[SearchRequest]
    ) -> list[list[SearchHit] | RetrievalError]:
        """`search_batch`, except that a request that fails (an unknown store, say) gets its
        error in its place and the others their hits: the batch is searched again one by one."""
        try:
            return self.search_batch(requests)
        except RetrievalError:
            if len(requests) == 1:
                raise
        results: list[list[SearchHit] | RetrievalError] = []
        for request in requests:
            try:
                results.append(self.search_batch([request])[0])
            except RetrievalError as exc:
                results.append(exc)
        return results

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """Normalised all-MiniLM-L6-v2 embeddings (384 floats each), for /v1/embeddings."""
        if not texts:
            raise InvalidRequest("give at least one text to embed", param="input")
        return self.store.embedder.embed(list(texts)).tolist()

    def embed_counted(self, texts: Sequence[str]) -> tuple[list[list[float]], int]:
        """`embed`, and the tokens the embedder read (the response's usage)."""
        return self.embed(texts), self.store.embedder.count_tokens(list(texts))

    # Files

    def create_file(self, filename: str, data: bytes, purpose: str = "assistants") -> dict:
        return self.store.create_file(filename, data, purpose).to_openai()

    def list_files(
        self,
        limit: int = 10000,
        order: str = "desc",
        after: str | None = None,
        purpose: str | None = None,
    ) -> dict:
        records = [f.to_openai() for f in self.store.list_files(purpose)]
        return _page(records, limit, order, after, max_limit=10000)

    def retrieve_file(self, file_id: str) -> dict:
        return self.store.retrieve_file(file_id).to_openai()

    def file_content(self, file_id: str) -> tuple[str, bytes]:
        """(filename, bytes as uploaded)."""
        return self.store.retrieve_file(file_id).filename, self.store.file_content(file_id)

    def delete_file(self, file_id: str) -> dict:
        self.store.delete_file(file_id)
        return {"id": file_id, "object": "file", "deleted": True}

    # Vector stores

    def create_vector_store(
        self,
        name: str | None = None,
        file_ids: Sequence[str] = (),
        chunking_strategy: dict[str, Any] | None = None,
        metadata: dict[str, str] | None = None,
    ) -> dict:
        return self.store.create_vector_store(
            name, file_ids, chunking_strategy, metadata
        ).to_openai()

    def list_vector_stores(
        self, limit: int = 20, order: str = "desc", after: str | None = None
    ) -> dict:
        records = [s.to_openai() for s in self.store.list_vector_stores()]
        return _page(records, limit, order, after)

    def retrieve_vector_store(self, vector_store_id: str) -> dict:
        return self.store.retrieve_vector_store(vector_store_id).to_openai()

    def delete_vector_store(self, vector_store_id: str) -> dict:
        self.store.delete_vector_store(vector_store_id)
        return {"id": vector_store_id, "object": "vector_store.deleted", "deleted": True}

    def attach_file(
        self,
        vector_store_id: str,
        file_id: str,
        chunking_strategy: dict[str, Any] | None = None,
        attributes: dict[str, Any] | None = None,
    ) -> dict:
        return self.store.attach_file(
            vector_store_id, file_id, chunking_strategy, attributes
        ).to_openai()

    def list_vector_store_files(
        self,
        vector_store_id: str,
        limit: int = 20,
        order: str = "desc",
        after: str | None = None,
        status: str | None = None,
    ) -> dict:
        records = [
            f.to_openai() for f in self.store.list_vector_store_files(vector_store_id, status)
        ]
        return _page(records, limit, order, after)

    def retrieve_vector_store_file(self, vector_store_id: str, file_id: str) -> dict:
        return self.store.retrieve_vector_store_file(vector_store_id, file_id).to_openai()

    def detach_file(self, vector_store_id: str, file_id: str) -> dict:
        self.store.detach_file(vector_store_id, file_id)
        return {"id": file_id, "object": "vector_store.file.deleted", "deleted": True}

    def file_batch(self, operation: str, vector_store_id: str, *args: Any, **kw: Any) -> dict:
        """One call for the batch routes: create / retrieve / cancel / list_files."""
        method = {"create": self.create_file_batch, "retrieve": self.retrieve_file_batch,
                  "cancel": self.cancel_file_batch, "list_files": self.list_file_batch_files}  # fmt: skip
        return method[operation](vector_store_id, *args, **kw)

    def create_file_batch(self, vector_store_id: str, files: list[dict[str, Any]]) -> dict:
        return batches.create_file_batch(self.store, vector_store_id, files)

    def retrieve_file_batch(self, vector_store_id: str, batch_id: str) -> dict:
        return batches.retrieve_file_batch(self.store, vector_store_id, batch_id)

    def cancel_file_batch(self, vector_store_id: str, batch_id: str) -> dict:
        return batches.cancel_file_batch(self.store, vector_store_id, batch_id)

    def list_file_batch_files(self, vector_store_id: str, batch_id: str, limit: int = 20,
                              order: str = "desc", after: str | None = None,
                              status: str | None = None) -> dict:  # fmt: skip
        records = batches.file_batch_files(self.store, vector_store_id, batch_id, status)
        return _page(records, limit, order, after)

    def search_vector_store(
        self,
        vector_store_id: str,
        query: str | Sequence[str],
        max_num_results: int = 10,
        score_threshold: float = 0.0,
        filters: dict | None = None,
    ) -> dict:
        """One page of `vector_stores.search` results."""
        queries = [query] if isinstance(query, str) else list(query)
        hits = self.store.search(
            [vector_store_id], " ".join(queries), max_num_results, score_threshold, filters
        )
        return {
            "object": "vector_store.search_results.page",
            "search_query": queries,
            "data": [h.to_openai() for h in hits],
            "has_more": False,
            "next_page": None,
        }


def ensure_builtin_store(store: DocumentStore, documents: Sequence[Any]) -> bool:
    """Create the vector store "world" from the built-in documents once; True if created.

    Items of `documents` (models.builtin.world.world_documents() in the application) may be
    dicts with a name (filename/title/name/id) and text (text/content), (name, text) pairs, or
    plain strings.
    """
    if any(s.id == BUILTIN_STORE_ID for s in store.list_vector_stores()):
        return False
    file_ids = []
    for n, doc in enumerate(documents):
        name, text = _name_and_text(doc, n)
        file_ids.append(store.create_file(name, text.encode(), "assistants").id)
    try:
        store.create_vector_store(
            "world", file_ids, metadata={"builtin": "true"}, vector_store_id=BUILTIN_STORE_ID
        )
    except InvalidRequest:  # another replica created it first
        for file_id in file_ids:
            store.delete_file(file_id)
        return False
    log.info(
        "created built-in vector store '%s' from %d documents", BUILTIN_STORE_ID, len(file_ids)
    )
    return True


def _name_and_text(doc: Any, n: int) -> tuple[str, str]:
    if isinstance(doc, str):
        name, text = f"world-{n:03d}", doc
    elif isinstance(doc, dict):
        name = next((str(doc[k]) for k in ("filename", "title", "name", "id") if doc.get(k)), "")
        text = doc.get("text") or doc.get("content") or ""
    elif isinstance(doc, tuple | list) and len(doc) == 2:
        name, text = str(doc[0]), str(doc[1])
    else:
        name = str(getattr(doc, "filename", "") or getattr(doc, "title", ""))
        text = str(getattr(doc, "text", "") or getattr(doc, "content", ""))
    name = name or f"world-{n:03d}"
    if "." not in name.rsplit("/", 1)[-1]:
        name += ".txt"
    return name, text


def _page(
    records: list[dict], limit: int, order: str, after: str | None, max_limit: int = LIST_LIMIT_MAX
) -> dict:
    """An OpenAI cursor page: `data`, `first_id`, `last_id`, `has_more`."""
    if order not in ("asc", "desc"):
        raise InvalidRequest(f"order must be 'asc' or 'desc', got {order!r}", param="order")
    if not 1 <= limit <= max_limit:
        raise InvalidRequest(f"limit must be from 1 to {max_limit}, got {limit}", param="limit")
    if order == "desc":
        records = records[::-1]
    if after is not None:
        ids = [r["id"] for r in records]
        if after not in ids:
            raise InvalidRequest(f"'after' names an unknown id '{after}'", param="after")
        records = records[ids.index(after) + 1 :]
    data = records[:limit]
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": len(records) > limit,
    }


class InProcessHandle:
    """Calls an object's methods like a Ray Serve handle: `await handle.name.remote(...)`.

    Each call runs in a worker thread, as a replica would run it off the event loop.
    """

    def __init__(self, target: Any):
        self._target = target

    def __getattr__(self, name: str) -> _InProcessMethod:
        return _InProcessMethod(getattr(self._target, name))


class _InProcessMethod:
    def __init__(self, method):
        self._method = method

    def remote(self, *args, **kwargs):
        return asyncio.to_thread(self._method, *args, **kwargs)
