"""DocumentStore: uploaded files, vector stores of embedded chunks, and search over them.

Layout under `data_dir`:
  retrieval.sqlite3   files, vector stores, attachments, chunks (text + embedding): the truth
  files/<file_id>     the uploaded bytes
  indexes/<vs_id>.faiss   one FAISS index per vector store, a cache of the chunks' embeddings

Writes are atomic. Each change is one SQLite transaction; the FAISS index is then updated in
memory and written to a temp file that replaces the old one. A crash between the two leaves an
index that lags the database, and loading reconciles them (adds missing ids from the stored
embeddings, drops ids the database no longer has), so the last committed state is what a restart
sees. Attaching holds a lock per vector store from commit to index save, so concurrent uploads
to one store lose nothing; embedding runs outside that lock.

Several processes (Retriever replicas) may share one data_dir: every write bumps the store's
version in the database, and a process whose in-memory index is behind reloads it before
searching.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import sqlite3
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from models.retrieval.chunking import ChunkingStrategy, chunk_text, resolve_chunking_strategy
from models.retrieval.errors import FileTooLarge, InvalidRequest, NotFoundError
from models.retrieval.index import INDEX_KINDS, VectorIndex
from models.retrieval.parsing import extract_text
from models.retrieval.records import (
    FileRecord,
    SearchHit,
    VectorStoreFileRecord,
    VectorStoreRecord,
)

log = logging.getLogger(__name__)

PURPOSES = ("assistants", "user_data")
EMBED_BATCH = 256
ORPHAN_AGE_S = 3600  # leftover files older than this are removed on start  # chunks per embedder call; progress is logged per batch for large files

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY, filename TEXT NOT NULL, bytes INTEGER NOT NULL,
    created_at INTEGER NOT NULL, purpose TEXT NOT NULL, text TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS vector_stores (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, created_at INTEGER NOT NULL,
    last_active_at INTEGER NOT NULL, metadata TEXT NOT NULL, index_kind TEXT NOT NULL,
    version INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS vector_store_files (
    vector_store_id TEXT NOT NULL REFERENCES vector_stores(id) ON DELETE CASCADE,
    file_id TEXT NOT NULL REFERENCES files(id) ON DELETE CASCADE,
    created_at INTEGER NOT NULL, status TEXT NOT NULL, usage_bytes INTEGER NOT NULL,
    chunk_count INTEGER NOT NULL, chunking_strategy TEXT NOT NULL, attributes TEXT NOT NULL,
    PRIMARY KEY (vector_store_id, file_id));
CREATE TABLE IF NOT EXISTS chunks (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    vector_store_id TEXT NOT NULL, file_id TEXT NOT NULL, position INTEGER NOT NULL,
    text TEXT NOT NULL, embedding BLOB NOT NULL,
    FOREIGN KEY (vector_store_id, file_id)
        REFERENCES vector_store_files(vector_store_id, file_id) ON DELETE CASCADE);
CREATE INDEX IF NOT EXISTS chunks_by_store ON chunks(vector_store_id);
CREATE INDEX IF NOT EXISTS chunks_by_attachment ON chunks(vector_store_id, file_id);
CREATE INDEX IF NOT EXISTS attachments_by_file ON vector_store_files(file_id);
"""


@dataclass(frozen=True)
class SearchRequest:
    """One query against some vector stores (the unit `search_many` batches)."""

    vector_store_ids: Sequence[str]
    query: str
    max_num_results: int = 10
    score_threshold: float = 0.0


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
        self._files_dir = os.path.join(self.data_dir, "files")
        self._indexes_dir = os.path.join(self.data_dir, "indexes")
        os.makedirs(self._files_dir, exist_ok=True)
        os.makedirs(self._indexes_dir, exist_ok=True)
        self._db_lock = threading.RLock()
        self._db = sqlite3.connect(
            os.path.join(self.data_dir, "retrieval.sqlite3"),
            check_same_thread=False,
            isolation_level=None,
            timeout=30,  # other replicas may hold the write lock while they commit
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(_SCHEMA)
        self._locks_lock = threading.Lock()
        self._store_locks: dict[str, threading.Lock] = {}
        self._indexes: dict[str, VectorIndex] = {}
        self._versions: dict[str, int] = {}  # the database version each in-memory index holds
        self._load()

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
        with self._db_lock:
            self._db.close()

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
        _write_atomically(self._file_path(record.id), data)
        with self._transaction() as db:
            db.execute(
                "INSERT INTO files (id, filename, bytes, created_at, purpose, text) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (record.id, filename, record.bytes, record.created_at, purpose, text),
            )
        return record

    def list_files(self, purpose: str | None = None) -> list[FileRecord]:
        """Every file, oldest first."""
        sql = "SELECT id, filename, bytes, created_at, purpose FROM files"
        args: tuple = ()
        if purpose:
            sql, args = sql + " WHERE purpose = ?", (purpose,)
        return [FileRecord(*row) for row in self._query(sql + " ORDER BY rowid", args)]

    def retrieve_file(self, file_id: str) -> FileRecord:
        rows = self._query(
            "SELECT id, filename, bytes, created_at, purpose FROM files WHERE id = ?", (file_id,)
        )
        if not rows:
            raise NotFoundError(f"no file with id '{file_id}'", param="file_id")
        return FileRecord(*rows[0])

    def file_content(self, file_id: str) -> bytes:
        """The bytes as uploaded."""
        self.retrieve_file(file_id)
        with open(self._file_path(file_id), "rb") as f:
            return f.read()

    def delete_file(self, file_id: str) -> None:
        """Delete a file, its bytes, and its chunks from every vector store."""
        with self._transaction() as db:
            if not db.execute("SELECT 1 FROM files WHERE id = ?", (file_id,)).fetchone():
                raise NotFoundError(f"no file with id '{file_id}'", param="file_id")
            removed = self._chunk_ids_by_store(db, "file_id = ?", (file_id,))
            versions = {s: _bump_version(db, s) for s in removed}
            db.execute("DELETE FROM files WHERE id = ?", (file_id,))
        for store_id, ids in removed.items():
            self._remove_from_index(store_id, ids, versions[store_id])
        _unlink_quietly(self._file_path(file_id))

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
            self.retrieve_file(file_id)
        store_id = vector_store_id or "vs_" + secrets.token_hex(12)
        now = int(time.time())
        with self._transaction() as db:
            if db.execute("SELECT 1 FROM vector_stores WHERE id = ?", (store_id,)).fetchone():
                raise InvalidRequest(f"vector store '{store_id}' already exists", param="id")
            db.execute(
                "INSERT INTO vector_stores (id, name, created_at, last_active_at, metadata, "
                "index_kind) VALUES (?, ?, ?, ?, ?, ?)",
                (store_id, name or "", now, now, json.dumps(metadata or {}), self.index_kind),
            )
        with self._store_lock(store_id):
            self._indexes[store_id] = VectorIndex(self.index_kind)
            self._versions[store_id] = 0
            self._save_index(store_id)
        for file_id in file_ids:
            self._attach(store_id, file_id, strategy, {})
        return self.retrieve_vector_store(store_id)

    def list_vector_stores(self) -> list[VectorStoreRecord]:
        """Every vector store, oldest first."""
        ids = [r[0] for r in self._query("SELECT id FROM vector_stores ORDER BY rowid")]
        return [self.retrieve_vector_store(i) for i in ids]

    def retrieve_vector_store(self, vector_store_id: str) -> VectorStoreRecord:
        rows = self._query(
            "SELECT id, name, created_at, last_active_at, metadata, index_kind "
            "FROM vector_stores WHERE id = ?",
            (vector_store_id,),
        )
        if not rows:
            raise NotFoundError(
                f"no vector store with id '{vector_store_id}'", param="vector_store_id"
            )
        store_id, name, created_at, last_active_at, metadata, index_kind = rows[0]
        counts = dict(
            self._query(
                "SELECT status, COUNT(*) FROM vector_store_files WHERE vector_store_id = ? "
                "GROUP BY status",
                (store_id,),
            )
        )
        usage = self._query(
            "SELECT COALESCE(SUM(usage_bytes), 0) FROM vector_store_files "
            "WHERE vector_store_id = ?",
            (store_id,),
        )[0][0]
        file_counts = {
            s: counts.get(s, 0) for s in ("in_progress", "completed", "failed", "cancelled")
        }
        file_counts["total"] = sum(counts.values())
        return VectorStoreRecord(
            id=store_id,
            name=name,
            created_at=created_at,
            last_active_at=last_active_at,
            metadata=json.loads(metadata),
            file_counts=file_counts,
            usage_bytes=usage,
            index_kind=index_kind,
        )

    def delete_vector_store(self, vector_store_id: str) -> None:
        """Delete a vector store, its chunks and its index (the files stay)."""
        with self._transaction() as db:
            if not db.execute(
                "SELECT 1 FROM vector_stores WHERE id = ?", (vector_store_id,)
            ).fetchone():
                raise NotFoundError(
                    f"no vector store with id '{vector_store_id}'", param="vector_store_id"
                )
            db.execute("DELETE FROM vector_stores WHERE id = ?", (vector_store_id,))
        with self._store_lock(vector_store_id):
            self._indexes.pop(vector_store_id, None)
            self._versions.pop(vector_store_id, None)
            _unlink_quietly(self._index_path(vector_store_id))

    # Files in vector stores

    def attach_file(
        self,
        vector_store_id: str,
        file_id: str,
        chunking_strategy: dict[str, Any] | None = None,
        attributes: dict[str, Any] | None = None,
    ) -> VectorStoreFileRecord:
        """Chunk, embed and index a file into a vector store; attaching twice is a no-op."""
        self.retrieve_vector_store(vector_store_id)
        self.retrieve_file(file_id)
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
        self.retrieve_vector_store(vector_store_id)
        self.retrieve_file(file_id)
        strategy = ChunkingStrategy(
            type="other", max_chunk_size_tokens=self.chunk_max_tokens, chunk_overlap_tokens=0
        )
        return self._index_chunks(
            vector_store_id, file_id, chunks, vectors, strategy, attributes or {}
        )

    def list_vector_store_files(
        self, vector_store_id: str, status: str | None = None
    ) -> list[VectorStoreFileRecord]:
        """Files attached to a vector store, oldest first."""
        self.retrieve_vector_store(vector_store_id)
        sql = f"{_ATTACHMENT_SELECT} WHERE vector_store_id = ?"
        args: tuple = (vector_store_id,)
        if status:
            sql, args = sql + " AND status = ?", (*args, status)
        return [_attachment(row) for row in self._query(sql + " ORDER BY rowid", args)]

    def retrieve_vector_store_file(
        self, vector_store_id: str, file_id: str
    ) -> VectorStoreFileRecord:
        rows = self._query(
            f"{_ATTACHMENT_SELECT} WHERE vector_store_id = ? AND file_id = ?",
            (vector_store_id, file_id),
        )
        if not rows:
            self.retrieve_vector_store(vector_store_id)
            raise NotFoundError(
                f"file '{file_id}' is not in vector store '{vector_store_id}'", param="file_id"
            )
        return _attachment(rows[0])

    def detach_file(self, vector_store_id: str, file_id: str) -> None:
        """Remove a file's chunks from one vector store (the file itself stays)."""
        self.retrieve_vector_store_file(vector_store_id, file_id)
        with self._transaction() as db:
            removed = self._chunk_ids_by_store(
                db, "vector_store_id = ? AND file_id = ?", (vector_store_id, file_id)
            )
            version = _bump_version(db, vector_store_id)
            db.execute(
                "DELETE FROM vector_store_files WHERE vector_store_id = ? AND file_id = ?",
                (vector_store_id, file_id),
            )
        for store_id, ids in removed.items():
            self._remove_from_index(store_id, ids, version)

    # Search

    def search(
        self,
        vector_store_ids: Sequence[str],
        query: str,
        max_num_results: int = 10,
        score_threshold: float = 0.0,
    ) -> list[SearchHit]:
        """The chunks most similar to `query` across the stores, best first."""
        request = SearchRequest(vector_store_ids, query, max_num_results, score_threshold)
        return self.search_many([request])[0]

    def search_many(self, requests: Sequence[SearchRequest]) -> list[list[SearchHit]]:
        """Several searches with one embedder call (what concurrent requests batch into)."""
        if not requests:
            return []
        for request in requests:
            _check_search_args(request)
        vectors = self.embedder.embed([r.query for r in requests])
        return self.search_vectors(requests, vectors)

    def search_vectors(
        self, requests: Sequence[SearchRequest], vectors: np.ndarray
    ) -> list[list[SearchHit]]:
        """Search with query embeddings already computed; `vectors[i]` is `requests[i]`'s."""
        store_ids = sorted({s for r in requests for s in r.vector_store_ids})
        versions = self._store_versions(store_ids)
        candidates: list[list[tuple[float, int]]] = [[] for _ in requests]
        for store_id in store_ids:
            rows = [i for i, r in enumerate(requests) if store_id in r.vector_store_ids]
            k = max(requests[i].max_num_results for i in rows)
            with self._store_lock(store_id):
                index = self._current_index(store_id, versions[store_id])
                if index is None:
                    continue
                scores, ids = index.search(vectors[rows], k)
            for row, row_scores, row_ids in zip(rows, scores, ids, strict=True):
                candidates[row].extend(
                    (float(s), int(i)) for s, i in zip(row_scores, row_ids, strict=True) if i >= 0
                )
        chunks = self._chunks_by_id({i for found in candidates for _, i in found})
        results = []
        for request, found in zip(requests, candidates, strict=True):
            found.sort(key=lambda pair: (-pair[0], pair[1]))
            hits = [
                SearchHit(score=score, **chunks[chunk_id])
                for score, chunk_id in found
                if score >= request.score_threshold and chunk_id in chunks
            ]
            results.append(hits[: request.max_num_results])
        return results

    def chunk_count(self, vector_store_id: str) -> int:
        """Chunks indexed in a vector store."""
        version = self._store_versions([vector_store_id])[vector_store_id]
        with self._store_lock(vector_store_id):
            index = self._current_index(vector_store_id, version)
            return len(index) if index else 0

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
        existing = self._query(
            f"{_ATTACHMENT_SELECT} WHERE vector_store_id = ? AND file_id = ?", (store_id, file_id)
        )
        if existing:
            return _attachment(existing[0])
        rows = self._query("SELECT filename, text FROM files WHERE id = ?", (file_id,))
        if not rows:
            raise NotFoundError(f"no file with id '{file_id}'", param="file_id")
        filename, text = rows[0]
        chunks = chunk_text(text, self.embedder.tokenizer, strategy)
        vectors = self._embed_chunks(chunks, f"{file_id} ({filename})")
        return self._index_chunks(store_id, file_id, chunks, vectors, strategy, attributes)

    def _index_chunks(
        self,
        store_id: str,
        file_id: str,
        chunks: list[str],
        vectors: np.ndarray,
        strategy: ChunkingStrategy,
        attributes: dict[str, Any],
    ) -> VectorStoreFileRecord:
        with self._store_lock(store_id):
            committed = self._commit_chunks(
                store_id, file_id, chunks, vectors, strategy, attributes
            )
            if committed is not None:
                ids, version = committed
                if self._versions.get(store_id) == version:
                    self._indexes[store_id].add(ids, vectors)
                    self._versions[store_id] = version + 1
                    self._save_index(store_id)
                else:  # another process wrote in between: the database has both
                    self._reload_index(store_id)
        return self.retrieve_vector_store_file(store_id, file_id)

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

    def _commit_chunks(
        self,
        store_id: str,
        file_id: str,
        chunks: list[str],
        vectors: np.ndarray,
        strategy: ChunkingStrategy,
        attributes: dict[str, Any],
    ) -> tuple[np.ndarray, int] | None:
        """One transaction: the attachment row and its chunks; returns their ids and the store's
        version before it. None if already attached."""
        usage = sum(len(c.encode()) for c in chunks) + vectors.nbytes
        with self._transaction() as db:
            if not db.execute("SELECT 1 FROM vector_stores WHERE id = ?", (store_id,)).fetchone():
                raise NotFoundError(
                    f"vector store '{store_id}' was deleted", param="vector_store_id"
                )
            if not db.execute("SELECT 1 FROM files WHERE id = ?", (file_id,)).fetchone():
                raise NotFoundError(f"file '{file_id}' was deleted", param="file_id")
            if db.execute(
                "SELECT 1 FROM vector_store_files WHERE vector_store_id = ? AND file_id = ?",
                (store_id, file_id),
            ).fetchone():
                return None
            now = int(time.time())
            db.execute(
                "INSERT INTO vector_store_files (vector_store_id, file_id, created_at, status, "
                "usage_bytes, chunk_count, chunking_strategy, attributes) "
                "VALUES (?, ?, ?, 'completed', ?, ?, ?, ?)",
                (
                    store_id,
                    file_id,
                    now,
                    usage,
                    len(chunks),
                    strategy.model_dump_json(),
                    json.dumps(attributes),
                ),
            )
            ids = self._insert_chunks(db, store_id, file_id, chunks, vectors)
            version = _bump_version(db, store_id)
            db.execute("UPDATE vector_stores SET last_active_at = ? WHERE id = ?", (now, store_id))
        return ids, version

    def _insert_chunks(
        self, db: sqlite3.Connection, store_id: str, file_id: str, chunks: list[str], vectors
    ) -> np.ndarray:
        # Ids are assigned here, inside the write transaction, so they are known without a
        # round trip per row; AUTOINCREMENT's sequence guarantees they are never reused.
        row = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'chunks'").fetchone()
        first = (row[0] if row else 0) + 1
        ids = np.arange(first, first + len(chunks), dtype=np.int64)
        db.executemany(
            "INSERT INTO chunks (id, vector_store_id, file_id, position, text, embedding) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            [
                (int(i), store_id, file_id, pos, text, vectors[pos].tobytes())
                for pos, (i, text) in enumerate(zip(ids, chunks, strict=True))
            ],
        )
        return ids

    # Internals: indexes

    def _remove_from_index(self, store_id: str, ids: np.ndarray, version: int) -> None:
        with self._store_lock(store_id):
            index = self._indexes.get(store_id)
            if index is None:
                return
            if self._versions.get(store_id) != version:
                self._reload_index(store_id)
                return
            if index.supports_remove:
                index.remove(ids)
            else:
                index.reset(*self._stored_vectors(store_id))
            self._versions[store_id] = version + 1
            self._save_index(store_id)

    def _reload_index(self, store_id: str) -> None:
        """Load the store's index again, reconciled with the database (caller holds its lock)."""
        rows = self._query(
            "SELECT index_kind, version FROM vector_stores WHERE id = ?", (store_id,)
        )
        if not rows:
            self._indexes.pop(store_id, None)
            self._versions.pop(store_id, None)
            return
        kind, version = rows[0]
        self._indexes[store_id] = self._load_index(store_id, kind)
        self._versions[store_id] = version

    def _current_index(self, store_id: str, version: int) -> VectorIndex | None:
        """The store's index, reloaded first if the database is ahead of it (versions only grow;
        an index already past `version` was updated by this process since it was read)."""
        if self._versions.get(store_id, -1) < version:
            self._reload_index(store_id)
        return self._indexes.get(store_id)

    def _save_index(self, store_id: str) -> None:
        self._indexes[store_id].save(self._index_path(store_id))

    def _load(self) -> None:
        """Load every store's index and reconcile it with the database."""
        for store_id, kind, version in self._query(
            "SELECT id, index_kind, version FROM vector_stores"
        ):
            self._indexes[store_id] = self._load_index(store_id, kind)
            self._versions[store_id] = version
        known = {f"{s}.faiss" for s in self._indexes}
        files = {r[0] for r in self._query("SELECT id FROM files")}
        # Orphans: a deleted store's index, a crashed save's temp file, the bytes of an upload
        # that crashed before its commit. Only old ones: another replica may be mid-write.
        for directory, keep in ((self._indexes_dir, known), (self._files_dir, files)):
            for name in os.listdir(directory):
                path = os.path.join(directory, name)
                if name not in keep and _age_s(path) > ORPHAN_AGE_S:
                    _unlink_quietly(path)

    def _load_index(self, store_id: str, kind: str) -> VectorIndex:
        path = self._index_path(store_id)
        db_ids = np.array(
            [
                r[0]
                for r in self._query("SELECT id FROM chunks WHERE vector_store_id = ?", (store_id,))
            ],
            dtype=np.int64,
        )
        try:
            index = VectorIndex.load(path, kind)
        except (OSError, RuntimeError, ValueError) as exc:
            if len(db_ids):
                log.warning(
                    "index of %s unreadable (%s); rebuilding from the database", store_id, exc
                )
            index = VectorIndex(kind)
        index_ids = index.ids()
        extra = np.setdiff1d(index_ids, db_ids)
        missing = np.setdiff1d(db_ids, index_ids)
        if len(extra) or len(missing) or not os.path.exists(path):
            log.info(
                "reconciling index of %s: +%d chunks from the database, -%d stale",
                store_id,
                len(missing),
                len(extra),
            )
            if index.supports_remove:
                index.remove(extra)
                index.add(*self._stored_vectors(store_id, missing))
            else:
                index.reset(*self._stored_vectors(store_id))
            index.save(path)
        return index

    def _stored_vectors(
        self, store_id: str, only_ids: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Chunk ids and embeddings of a store, as committed to the database."""
        rows = self._query(
            "SELECT id, embedding FROM chunks WHERE vector_store_id = ? ORDER BY id", (store_id,)
        )
        if only_ids is not None:
            wanted = set(only_ids.tolist())
            rows = [r for r in rows if r[0] in wanted]
        ids = np.array([r[0] for r in rows], dtype=np.int64)
        dim = self.embedder.dim
        vectors = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(-1, dim)
        return ids, vectors

    # Internals: database

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._db_lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _query(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._db_lock:
            return self._db.execute(sql, args).fetchall()

    def _chunk_ids_by_store(
        self, db: sqlite3.Connection, where: str, args: tuple
    ) -> dict[str, np.ndarray]:
        by_store: dict[str, list[int]] = {}
        for chunk_id, store_id in db.execute(
            f"SELECT id, vector_store_id FROM chunks WHERE {where}", args
        ):
            by_store.setdefault(store_id, []).append(chunk_id)
        return {s: np.array(ids, dtype=np.int64) for s, ids in by_store.items()}

    def _chunks_by_id(self, ids: set[int]) -> dict[int, dict[str, Any]]:
        if not ids:
            return {}
        marks = ",".join("?" * len(ids))
        rows = self._query(
            "SELECT c.id, c.vector_store_id, c.file_id, f.filename, c.text, a.attributes "
            "FROM chunks c JOIN files f ON f.id = c.file_id "
            "JOIN vector_store_files a "
            "ON a.vector_store_id = c.vector_store_id AND a.file_id = c.file_id "
            f"WHERE c.id IN ({marks})",
            tuple(ids),
        )
        return {
            row[0]: {
                "chunk_id": f"chunk_{row[0]}",
                "vector_store_id": row[1],
                "file_id": row[2],
                "filename": row[3],
                "text": row[4],
                "attributes": json.loads(row[5]),
            }
            for row in rows
        }

    def _store_versions(self, store_ids: Sequence[str]) -> dict[str, int]:
        """Database version of each store; NotFoundError names the first that does not exist."""
        marks = ",".join("?" * len(store_ids))
        found = dict(
            self._query(
                f"SELECT id, version FROM vector_stores WHERE id IN ({marks})", tuple(store_ids)
            )
        )
        for store_id in store_ids:
            if store_id not in found:
                raise NotFoundError(
                    f"no vector store with id '{store_id}'", param="vector_store_ids"
                )
        return found

    def _store_lock(self, store_id: str) -> threading.Lock:
        with self._locks_lock:
            return self._store_locks.setdefault(store_id, threading.Lock())

    def _file_path(self, file_id: str) -> str:
        return os.path.join(self._files_dir, file_id)

    def _index_path(self, store_id: str) -> str:
        return os.path.join(self._indexes_dir, f"{store_id}.faiss")


_ATTACHMENT_SELECT = (
    "SELECT file_id, vector_store_id, created_at, status, usage_bytes, chunk_count, "
    "chunking_strategy, attributes FROM vector_store_files"
)


def _attachment(row: tuple) -> VectorStoreFileRecord:
    file_id, store_id, created_at, status, usage, count, strategy, attributes = row
    return VectorStoreFileRecord(
        id=file_id,
        vector_store_id=store_id,
        created_at=created_at,
        status=status,
        usage_bytes=usage,
        chunk_count=count,
        chunking_strategy=ChunkingStrategy.model_validate_json(strategy).to_openai(),
        attributes=json.loads(attributes),
    )


def _bump_version(db: sqlite3.Connection, store_id: str) -> int:
    """Increment a store's version inside a write transaction; returns the version before."""
    version = db.execute("SELECT version FROM vector_stores WHERE id = ?", (store_id,)).fetchone()[
        0
    ]
    db.execute("UPDATE vector_stores SET version = ? WHERE id = ?", (version + 1, store_id))
    return version


def _check_search_args(request: SearchRequest) -> None:
    if not request.vector_store_ids:
        raise InvalidRequest("name at least one vector store to search", param="vector_store_ids")
    if not 1 <= request.max_num_results <= 50:
        raise InvalidRequest(
            f"max_num_results must be from 1 to 50, got {request.max_num_results}",
            param="max_num_results",
        )
    if not request.query.strip():
        raise InvalidRequest("the search query is empty", param="query")


def _write_atomically(path: str, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)
        raise


def _age_s(path: str) -> float:
    try:
        return time.time() - os.path.getmtime(path)
    except FileNotFoundError:
        return 0.0


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
