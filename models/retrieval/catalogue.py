"""The SQLite catalogue, `retrieval.sqlite3`: the truth about files, vector stores, which files
are attached to which store, and their chunks (text + embedding).

Each change is one transaction. Every change to a store's chunks bumps the store's `version`, so
a process holding an in-memory index can tell it is behind (other replicas share the file).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from models.retrieval.chunking import ChunkingStrategy
from models.retrieval.errors import InvalidRequest, NotFoundError
from models.retrieval.records import FileRecord, VectorStoreFileRecord, VectorStoreRecord

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
CREATE TABLE IF NOT EXISTS file_batches (
    id TEXT PRIMARY KEY,
    vector_store_id TEXT NOT NULL REFERENCES vector_stores(id) ON DELETE CASCADE,
    created_at INTEGER NOT NULL, file_ids TEXT NOT NULL, failed TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS chunks_by_store ON chunks(vector_store_id);
CREATE INDEX IF NOT EXISTS chunks_by_attachment ON chunks(vector_store_id, file_id);
CREATE INDEX IF NOT EXISTS attachments_by_file ON vector_store_files(file_id);
"""

_FILE_SELECT = "SELECT id, filename, bytes, created_at, purpose FROM files"
_ATTACHMENT_SELECT = (
    "SELECT file_id, vector_store_id, created_at, status, usage_bytes, chunk_count, "
    "chunking_strategy, attributes FROM vector_store_files"
)
FILE_STATUSES = ("in_progress", "completed", "failed", "cancelled")

ChunkIdsByStore = dict[str, np.ndarray]


@dataclass(frozen=True)
class EmbeddedFile:
    """A file's chunks with their embeddings, ready to attach to a vector store."""

    file_id: str
    chunks: list[str]
    vectors: np.ndarray  # (len(chunks), dim) float32, L2-normalised
    strategy: ChunkingStrategy
    attributes: dict[str, Any]


class Catalogue:
    """Files, vector stores, attachments and chunks in one SQLite database at `path`.

    Thread-safe (one connection behind a lock); processes sharing `path` wait up to 30 s for
    each other's write lock. Chunk ids are the FAISS ids of the indexes.
    """

    def __init__(self, path: str):
        self._lock = threading.RLock()
        self._db = sqlite3.connect(
            path,
            check_same_thread=False,
            isolation_level=None,
            timeout=30,  # other replicas may hold the write lock while they commit
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # Files

    def add_file(self, record: FileRecord, text: str) -> None:
        """Record an upload and the text extracted from it."""
        with self._transaction() as db:
            db.execute(
                "INSERT INTO files (id, filename, bytes, created_at, purpose, text) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (record.id, record.filename, record.bytes, record.created_at, record.purpose, text),
            )

    def list_files(self, purpose: str | None = None) -> list[FileRecord]:
        """Every file, oldest first."""
        sql, args = _FILE_SELECT, ()
        if purpose:
            sql, args = sql + " WHERE purpose = ?", (purpose,)
        return [FileRecord(*row) for row in self._query(sql + " ORDER BY rowid", args)]

    def file(self, file_id: str) -> FileRecord:
        rows = self._query(f"{_FILE_SELECT} WHERE id = ?", (file_id,))
        if not rows:
            raise NotFoundError(f"no file with id '{file_id}'", param="file_id")
        return FileRecord(*rows[0])

    def file_text(self, file_id: str) -> tuple[str, str]:
        """(filename, text extracted at upload)."""
        rows = self._query("SELECT filename, text FROM files WHERE id = ?", (file_id,))
        if not rows:
            raise NotFoundError(f"no file with id '{file_id}'", param="file_id")
        return rows[0]

    def file_ids(self) -> set[str]:
        return {r[0] for r in self._query("SELECT id FROM files")}

    def delete_file(self, file_id: str) -> tuple[ChunkIdsByStore, dict[str, int]]:
        """Delete a file with its attachments and chunks; returns the removed chunk ids by store
        and each such store's version before the change."""
        with self._transaction() as db:
            if not db.execute("SELECT 1 FROM files WHERE id = ?", (file_id,)).fetchone():
                raise NotFoundError(f"no file with id '{file_id}'", param="file_id")
            removed = _chunk_ids_by_store(db, "file_id = ?", (file_id,))
            versions = {s: _bump_version(db, s) for s in removed}
            db.execute("DELETE FROM files WHERE id = ?", (file_id,))
        return removed, versions

    # Vector stores

    def add_store(
        self, store_id: str, name: str, metadata: dict[str, str], index_kind: str
    ) -> None:
        """Record a new, empty vector store; InvalidRequest if the id is taken."""
        now = int(time.time())
        with self._transaction() as db:
            if db.execute("SELECT 1 FROM vector_stores WHERE id = ?", (store_id,)).fetchone():
                raise InvalidRequest(f"vector store '{store_id}' already exists", param="id")
            db.execute(
                "INSERT INTO vector_stores (id, name, created_at, last_active_at, metadata, "
                "index_kind) VALUES (?, ?, ?, ?, ?, ?)",
                (store_id, name, now, now, json.dumps(metadata), index_kind),
            )

    def store_ids(self) -> list[str]:
        """Every vector store's id, oldest first."""
        return [r[0] for r in self._query("SELECT id FROM vector_stores ORDER BY rowid")]

    def store(self, store_id: str) -> VectorStoreRecord:
        """A vector store with its file counts and usage."""
        rows = self._query(
            "SELECT id, name, created_at, last_active_at, metadata, index_kind "
            "FROM vector_stores WHERE id = ?",
            (store_id,),
        )
        if not rows:
            raise NotFoundError(f"no vector store with id '{store_id}'", param="vector_store_id")
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
        file_counts = {s: counts.get(s, 0) for s in FILE_STATUSES}
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

    def delete_store(self, store_id: str) -> None:
        """Delete a vector store with its attachments and chunks (the files stay)."""
        with self._transaction() as db:
            if not db.execute("SELECT 1 FROM vector_stores WHERE id = ?", (store_id,)).fetchone():
                raise NotFoundError(
                    f"no vector store with id '{store_id}'", param="vector_store_id"
                )
            db.execute("DELETE FROM vector_stores WHERE id = ?", (store_id,))

    def store_versions(self, store_ids: Sequence[str]) -> dict[str, int]:
        """Version of each store; NotFoundError names the first that does not exist."""
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

    def index_kinds(self) -> list[tuple[str, str, int]]:
        """(store id, index kind, version) of every vector store."""
        return self._query("SELECT id, index_kind, version FROM vector_stores")

    def index_kind(self, store_id: str) -> tuple[str, int] | None:
        """(index kind, version) of a store; None if it does not exist."""
        rows = self._query(
            "SELECT index_kind, version FROM vector_stores WHERE id = ?", (store_id,)
        )
        return rows[0] if rows else None

    # Files in vector stores

    def attachment(self, store_id: str, file_id: str) -> VectorStoreFileRecord | None:
        rows = self._query(
            f"{_ATTACHMENT_SELECT} WHERE vector_store_id = ? AND file_id = ?", (store_id, file_id)
        )
        return _attachment(rows[0]) if rows else None

    def attachments(self, store_id: str, status: str | None = None) -> list[VectorStoreFileRecord]:
        """Files attached to a store, oldest first."""
        sql = f"{_ATTACHMENT_SELECT} WHERE vector_store_id = ?"
        args: tuple = (store_id,)
        if status:
            sql, args = sql + " AND status = ?", (*args, status)
        return [_attachment(row) for row in self._query(sql + " ORDER BY rowid", args)]

    def attach(self, store_id: str, embedded: EmbeddedFile) -> tuple[np.ndarray, int] | None:
        """One transaction: the attachment row and its chunks; returns their ids and the store's
        version before it. None if already attached."""
        file_id, chunks, vectors = embedded.file_id, embedded.chunks, embedded.vectors
        usage = sum(len(c.encode()) for c in chunks) + vectors.nbytes
        with self._transaction() as db:
            _check_attachable(db, store_id, file_id)
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
                    embedded.strategy.model_dump_json(),
                    json.dumps(embedded.attributes),
                ),
            )
            ids = self._insert_chunks(db, store_id, file_id, chunks, vectors)
            version = _bump_version(db, store_id)
            db.execute("UPDATE vector_stores SET last_active_at = ? WHERE id = ?", (now, store_id))
        return ids, version

    def detach(self, store_id: str, file_id: str) -> tuple[ChunkIdsByStore, int]:
        """Remove a file's chunks from one store; returns the removed chunk ids by store and the
        store's version before the change."""
        with self._transaction() as db:
            removed = _chunk_ids_by_store(
                db, "vector_store_id = ? AND file_id = ?", (store_id, file_id)
            )
            version = _bump_version(db, store_id)
            db.execute(
                "DELETE FROM vector_store_files WHERE vector_store_id = ? AND file_id = ?",
                (store_id, file_id),
            )
        return removed, version

    # File batches: the files asked for, and those that failed (file id -> error message)

    def add_batch(self, batch_id: str, store_id: str, file_ids: list[str],
                  failed: dict[str, str]) -> None:  # fmt: skip
        with self._transaction() as db:
            db.execute("INSERT INTO file_batches (id, vector_store_id, created_at, file_ids, "
                       "failed) VALUES (?, ?, ?, ?, ?)", (batch_id, store_id, int(time.time()),
                       json.dumps(file_ids), json.dumps(failed)))  # fmt: skip

    def batch(self, store_id: str, batch_id: str) -> tuple[int, list[str], dict[str, str]]:
        """(created_at, file ids, failed: file id -> message) of a store's batch; 404 if none."""
        rows = self._query("SELECT created_at, file_ids, failed FROM file_batches WHERE id = ? "
                           "AND vector_store_id = ?", (batch_id, store_id))  # fmt: skip
        if not rows:
            raise NotFoundError(f"no file batch '{batch_id}' in vector store '{store_id}'",
                                param="batch_id")  # fmt: skip
        return rows[0][0], json.loads(rows[0][1]), json.loads(rows[0][2])

    # Chunks

    def chunk_ids(self, store_id: str) -> np.ndarray:
        """Ids of a store's chunks, int64."""
        rows = self._query("SELECT id FROM chunks WHERE vector_store_id = ?", (store_id,))
        return np.array([r[0] for r in rows], dtype=np.int64)

    def stored_vectors(
        self, store_id: str, dim: int, only_ids: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Chunk ids (n,) int64 and embeddings (n, dim) float32 of a store, by id."""
        rows = self._query(
            "SELECT id, embedding FROM chunks WHERE vector_store_id = ? ORDER BY id", (store_id,)
        )
        if only_ids is not None:
            wanted = set(only_ids.tolist())
            rows = [r for r in rows if r[0] in wanted]
        ids = np.array([r[0] for r in rows], dtype=np.int64)
        vectors = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(-1, dim)
        return ids, vectors

    def chunks_by_id(self, ids: set[int]) -> dict[int, dict[str, Any]]:
        """The SearchHit fields (less the score) of each chunk id that still exists."""
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

    # Internals

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

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _query(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()


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


def _check_attachable(db: sqlite3.Connection, store_id: str, file_id: str) -> None:
    """Both ends of an attachment still exist (either may be deleted while a file embeds)."""
    if not db.execute("SELECT 1 FROM vector_stores WHERE id = ?", (store_id,)).fetchone():
        raise NotFoundError(f"vector store '{store_id}' was deleted", param="vector_store_id")
    if not db.execute("SELECT 1 FROM files WHERE id = ?", (file_id,)).fetchone():
        raise NotFoundError(f"file '{file_id}' was deleted", param="file_id")


def _chunk_ids_by_store(db: sqlite3.Connection, where: str, args: tuple) -> ChunkIdsByStore:
    by_store: dict[str, list[int]] = {}
    for chunk_id, store_id in db.execute(
        f"SELECT id, vector_store_id FROM chunks WHERE {where}", args
    ):
        by_store.setdefault(store_id, []).append(chunk_id)
    return {s: np.array(ids, dtype=np.int64) for s, ids in by_store.items()}


def _bump_version(db: sqlite3.Connection, store_id: str) -> int:
    """Increment a store's version inside a write transaction; returns the version before."""
    row = db.execute("SELECT version FROM vector_stores WHERE id = ?", (store_id,)).fetchone()
    db.execute("UPDATE vector_stores SET version = ? WHERE id = ?", (row[0] + 1, store_id))
    return row[0]
