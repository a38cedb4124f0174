"""DocumentStore: uploaded files, vector stores of embedded chunks, and search over them.

Layout under `data_dir`:
  retrieval.sqlite3   files, vector stores, attachments, chunks (text + embedding): the truth
                      (catalogue.Catalogue)
  files/<file_id>     the uploaded bytes (blobs.BlobStore)
  indexes/<vs_id>.faiss   one FAISS index per vector store, a cache of the chunks' embeddings
                      (index.VectorStoreIndexes)

Writes are atomic. Each change is one SQLite transaction; the FAISS index is then updated in
memory and written to a temp file that replaces the old one; loading reconciles an index that
lags the database, so the last committed state is what a restart sees. Attaching holds a lock
per vector store from commit to index save, so concurrent uploads to one store lose nothing;
embedding runs outside that lock.

Several processes (Retriever replicas) may share one data_dir: every write bumps the store's
version in the database, and a process whose in-memory index is behind reloads it before
searching.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from models.retrieval.blobs import BlobStore
from models.retrieval.catalogue import Catalogue, EmbeddedFile
from models.retrieval.chunking import ChunkingStrategy, chunk_text, resolve_chunking_strategy
from models.retrieval.errors import FileTooLarge, InvalidRequest, NotFoundError
from models.retrieval.index import INDEX_KINDS, VectorStoreIndexes
from models.retrieval.parsing import extract_text
from models.retrieval.records import (
    FileRecord,
    SearchHit,
    VectorStoreFileRecord,
    VectorStoreRecord,
)
from models.retrieval.search import SearchRequest, check_search_request, search_indexes

log = logging.getLogger(__name__)

PURPOSES = ("assistants", "user_data")
EMBED_BATCH = 256  # chunks per embedder call; progress is logged per batch for large files
ORPHAN_AGE_S = 3600  # leftover files older than this are removed on start


class DocumentStore:
    """Files, vector stores and search, persisted under `data_dir` and reloaded on start.

    `embedder` is a models.embedding.Embedder (or anything with `embed(texts) -> (n, dim)
    normalised float32`, `dim` and a Hugging Face fast `tokenizer`). Thread-safe.
    """

    def __init__(
        self,
        data_dir: str,
        embedder: Any,
        *,
        index_kind: str = "flat",
        max_file_bytes: int = 20 * 1024 * 1024,
        chunk_max_tokens: int = 200,
        chunk_overlap_tokens: int = 40,
    ):
        if index_kind not in INDEX_KINDS:
            raise ValueError(f"index_kind must be one of {INDEX_KINDS}, got {index_kind!r}")
        self.data_dir = os.path.abspath(os.path.expanduser(data_dir))
        self.embedder = embedder
        self.index_kind = index_kind
        self.max_file_bytes = max_file_bytes
        self.chunk_max_tokens = chunk_max_tokens
        self.chunk_overlap_tokens = chunk_overlap_tokens
        self.blobs = BlobStore(os.path.join(self.data_dir, "files"))
        self.catalogue = Catalogue(os.path.join(self.data_dir, "retrieval.sqlite3"))
        self.indexes = VectorStoreIndexes(
            os.path.join(self.data_dir, "indexes"), self.catalogue, embedder.dim
        )
        self.indexes.load_all()
        # Only old leftovers go: another replica may be mid-write.
        self.indexes.remove_orphans(ORPHAN_AGE_S)
        self.blobs.remove_orphans(self.catalogue.file_ids(), ORPHAN_AGE_S)

    @classmethod
    def from_config(cls, config: Any, embedder: Any) -> DocumentStore:
        """A store set up from a models.retrieval.config.RetrievalConfig."""
        return cls(
            config.data_dir,
            embedder,
            index_kind=config.index,
            max_file_bytes=config.max_file_bytes,
            chunk_max_tokens=config.chunk_max_tokens,
            chunk_overlap_tokens=config.chunk_overlap_tokens,
        )

    def close(self) -> None:
        self.catalogue.close()

    # Files

    def create_file(self, filename: str, data: bytes, purpose: str = "assistants") -> FileRecord:
        """Store an upload after checking it parses; its bytes are kept under files/."""
        if purpose not in PURPOSES:
            raise InvalidRequest(
                f"purpose {purpose!r} is not supported here; use one of {', '.join(PURPOSES)}",
                param="purpose",
            )
        if len(data) > self.max_file_bytes:
            raise FileTooLarge(
                f"'{filename}' is {len(data)} bytes; the limit is {self.max_file_bytes} bytes",
                param="file",
            )
        filename = os.path.basename(filename.replace("\\", "/")) or "upload"
        text = extract_text(filename, data)
        record = FileRecord(
            id="file-" + secrets.token_hex(12),
            filename=filename,
            bytes=len(data),
            created_at=int(time.time()),
            purpose=purpose,
        )
        self.blobs.write(record.id, data)
        self.catalogue.add_file(record, text)
        return record

    def list_files(self, purpose: str | None = None) -> list[FileRecord]:
        """Every file, oldest first."""
        return self.catalogue.list_files(purpose)

    def retrieve_file(self, file_id: str) -> FileRecord:
        return self.catalogue.file(file_id)

    def file_content(self, file_id: str) -> bytes:
        """The bytes as uploaded."""
        self.catalogue.file(file_id)
        return self.blobs.read(file_id)

    def delete_file(self, file_id: str) -> None:
        """Delete a file, its bytes, and its chunks from every vector store."""
        removed, versions = self.catalogue.delete_file(file_id)
        for store_id, ids in removed.items():
            self.indexes.remove(store_id, ids, versions[store_id])
        self.blobs.delete(file_id)

    # Vector stores

    def create_vector_store(
        self,
        name: str | None = None,
        file_ids: Sequence[str] = (),
        chunking_strategy: dict[str, Any] | None = None,
        metadata: dict[str, str] | None = None,
        vector_store_id: str | None = None,
    ) -> VectorStoreRecord:
        """A new vector store, with `file_ids` attached; `vector_store_id` for fixed ids."""
        strategy = self._strategy(chunking_strategy)
        for file_id in file_ids:
            self.catalogue.file(file_id)
        store_id = vector_store_id or "vs_" + secrets.token_hex(12)
        self.catalogue.add_store(store_id, name or "", metadata or {}, self.index_kind)
        self.indexes.create(store_id, self.index_kind)
        for file_id in file_ids:
            self._attach(store_id, file_id, strategy, {})
        return self.catalogue.store(store_id)

    def list_vector_stores(self) -> list[VectorStoreRecord]:
        """Every vector store, oldest first."""
        return [self.catalogue.store(i) for i in self.catalogue.store_ids()]

    def retrieve_vector_store(self, vector_store_id: str) -> VectorStoreRecord:
        return self.catalogue.store(vector_store_id)

    def delete_vector_store(self, vector_store_id: str) -> None:
        """Delete a vector store, its chunks and its index (the files stay)."""
        self.catalogue.delete_store(vector_store_id)
        self.indexes.drop(vector_store_id)

    # Files in vector stores

    def attach_file(
        self,
        vector_store_id: str,
        file_id: str,
        chunking_strategy: dict[str, Any] | None = None,
        attributes: dict[str, Any] | None = None,
    ) -> VectorStoreFileRecord:
        """Chunk, embed and index a file into a vector store; attaching twice is a no-op."""
        self.catalogue.store(vector_store_id)
        self.catalogue.file(file_id)
        return self._attach(
            vector_store_id, file_id, self._strategy(chunking_strategy), attributes or {}
        )

    def attach_embedded_chunks(
        self,
        vector_store_id: str,
        file_id: str,
        chunks: list[str],
        vectors: np.ndarray,
        attributes: dict[str, Any] | None = None,
    ) -> VectorStoreFileRecord:
        """Attach a file as chunks embedded elsewhere (imports, benchmarks); `vectors` (n, dim)
        must be L2-normalised float32 from the same embedder."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.shape != (len(chunks), self.embedder.dim):
            raise InvalidRequest(
                f"vectors must have shape ({len(chunks)}, {self.embedder.dim}), got {vectors.shape}"
            )
        self.catalogue.store(vector_store_id)
        self.catalogue.file(file_id)
        strategy = ChunkingStrategy(
            type="other", max_chunk_size_tokens=self.chunk_max_tokens, chunk_overlap_tokens=0
        )
        return self._index(
            vector_store_id, EmbeddedFile(file_id, chunks, vectors, strategy, attributes or {})
        )

    def list_vector_store_files(
        self, vector_store_id: str, status: str | None = None
    ) -> list[VectorStoreFileRecord]:
        """Files attached to a vector store, oldest first."""
        self.catalogue.store(vector_store_id)
        return self.catalogue.attachments(vector_store_id, status)

    def retrieve_vector_store_file(
        self, vector_store_id: str, file_id: str
    ) -> VectorStoreFileRecord:
        record = self.catalogue.attachment(vector_store_id, file_id)
        if record is None:
            self.catalogue.store(vector_store_id)
            raise NotFoundError(
                f"file '{file_id}' is not in vector store '{vector_store_id}'", param="file_id"
            )
        return record

    def detach_file(self, vector_store_id: str, file_id: str) -> None:
        """Remove a file's chunks from one vector store (the file itself stays)."""
        self.retrieve_vector_store_file(vector_store_id, file_id)
        removed, version = self.catalogue.detach(vector_store_id, file_id)
        for store_id, ids in removed.items():
            self.indexes.remove(store_id, ids, version)

    # Search

    def search(
        self,
        vector_store_ids: Sequence[str],
        query: str,
        max_num_results: int = 10,
        score_threshold: float = 0.0,
        filters: dict | None = None,
    ) -> list[SearchHit]:
        """The chunks most similar to `query` across the stores, best first; only chunks of
        files whose attributes pass `filters` (models.retrieval.filters) when given."""
        request = SearchRequest(vector_store_ids, query, max_num_results, score_threshold, filters)
        return self.search_many([request])[0]

    def search_many(self, requests: Sequence[SearchRequest]) -> list[list[SearchHit]]:
        """Several searches with one embedder call (what concurrent requests batch into)."""
        if not requests:
            return []
        for request in requests:
            check_search_request(request)
        vectors = self.embedder.embed([r.query for r in requests])
        return self.search_vectors(requests, vectors)

    def search_vectors(
        self, requests: Sequence[SearchRequest], vectors: np.ndarray
    ) -> list[list[SearchHit]]:
        """Search with query embeddings already computed; `vectors[i]` is `requests[i]`'s."""
        return search_indexes(requests, vectors, self.catalogue, self.indexes)

    def chunk_count(self, vector_store_id: str) -> int:
        """Chunks indexed in a vector store."""
        version = self.catalogue.store_versions([vector_store_id])[vector_store_id]
        return self.indexes.size(vector_store_id, version)

    # Internals: attaching

    def _strategy(self, param: dict[str, Any] | None) -> ChunkingStrategy:
        return resolve_chunking_strategy(param, self.chunk_max_tokens, self.chunk_overlap_tokens)

    def _attach(
        self,
        store_id: str,
        file_id: str,
        strategy: ChunkingStrategy,
        attributes: dict[str, Any],
    ) -> VectorStoreFileRecord:
        existing = self.catalogue.attachment(store_id, file_id)
        if existing is not None:
            return existing
        filename, text = self.catalogue.file_text(file_id)
        chunks = chunk_text(text, self.embedder.tokenizer, strategy)
        vectors = self._embed_chunks(chunks, f"{file_id} ({filename})")
        return self._index(store_id, EmbeddedFile(file_id, chunks, vectors, strategy, attributes))

    def _index(self, store_id: str, embedded: EmbeddedFile) -> VectorStoreFileRecord:
        """Commit the chunks, then add them to the store's index, under the store's lock."""
        with self.indexes.lock(store_id):
            committed = self.catalogue.attach(store_id, embedded)
            if committed is not None:
                ids, version = committed
                self.indexes.add(store_id, ids, embedded.vectors, version)
        return self.retrieve_vector_store_file(store_id, embedded.file_id)

    def _embed_chunks(self, chunks: list[str], label: str) -> np.ndarray:
        parts = []
        for start in range(0, len(chunks), EMBED_BATCH):
            parts.append(self.embedder.embed(chunks[start : start + EMBED_BATCH]))
            if len(chunks) > EMBED_BATCH:
                done = min(start + EMBED_BATCH, len(chunks))
                log.info("embedded %d/%d chunks of %s", done, len(chunks), label)
        if not parts:
            return np.zeros((0, self.embedder.dim), dtype=np.float32)
        return np.ascontiguousarray(np.concatenate(parts), dtype=np.float32)
