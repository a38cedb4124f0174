"""One FAISS index per vector store, persisted atomically as `<directory>/<store_id>.faiss`.

Vectors are L2-normalised, so inner product is cosine similarity. `flat` is exact
(IndexIDMap2 over IndexFlatIP); `hnsw` is approximate and faster at large sizes. FAISS ids are
the chunks' SQLite row ids, so the index and the database can be reconciled after a crash.

The catalogue is the truth and an index is a cache of its embeddings: a change commits to the
catalogue first, then updates the index in memory and saves it. A crash between the two leaves
an index that lags, and loading reconciles it (adds missing ids from the stored embeddings, drops
ids the catalogue no longer has), so the last committed state is what a restart sees.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import TYPE_CHECKING

import faiss
import numpy as np

from models.embedding import EMBEDDING_DIM
from models.retrieval.disk import remove_old_files, unlink_quietly, write_atomically

if TYPE_CHECKING:
    from models.retrieval.catalogue import Catalogue

log = logging.getLogger(__name__)

INDEX_KINDS = ("flat", "hnsw")
HNSW_NEIGHBOURS = 32
HNSW_EF_SEARCH = 128


class VectorIndex:
    """A FAISS inner-product index keyed by int64 chunk ids. Not thread-safe: callers lock."""

    def __init__(self, kind: str = "flat", dim: int = EMBEDDING_DIM):
        if kind not in INDEX_KINDS:
            raise ValueError(f"index kind must be one of {INDEX_KINDS}, got {kind!r}")
        self.kind = kind
        self.dim = dim
        self.index = self._empty()

    def _empty(self) -> faiss.Index:
        if self.kind == "hnsw":
            inner = faiss.IndexHNSWFlat(self.dim, HNSW_NEIGHBOURS, faiss.METRIC_INNER_PRODUCT)
            inner.hnsw.efSearch = HNSW_EF_SEARCH
        else:
            inner = faiss.IndexFlatIP(self.dim)
        return faiss.IndexIDMap2(inner)

    def __len__(self) -> int:
        return self.index.ntotal

    def ids(self) -> np.ndarray:
        """The chunk ids held, int64."""
        return faiss.vector_to_array(self.index.id_map).astype(np.int64)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Add `vectors` (n, dim) float32 under `ids` (n,) int64."""
        if len(ids):
            self.index.add_with_ids(
                np.ascontiguousarray(vectors, dtype=np.float32), np.asarray(ids, dtype=np.int64)
            )

    def remove(self, ids: np.ndarray) -> None:
        """Remove `ids` (flat only; HNSW cannot delete, so callers rebuild it with `reset`)."""
        if len(ids):
            self.index.remove_ids(np.asarray(ids, dtype=np.int64))

    @property
    def supports_remove(self) -> bool:
        return self.kind == "flat"

    def reset(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Replace the whole content with `ids` and `vectors`."""
        self.index = self._empty()
        self.add(ids, vectors)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Scores and ids, each (n_queries, <= k), best first; unfilled slots have id -1."""
        if not len(self):
            n = len(queries)
            return np.empty((n, 0), np.float32), np.empty((n, 0), np.int64)
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        return self.index.search(queries, min(k, len(self)))

    def save(self, path: str) -> None:
        """Write to `path` atomically: a temp file in the same directory, fsync, os.replace."""
        write_atomically(path, faiss.serialize_index(self.index).tobytes())

    @classmethod
    def load(cls, path: str, kind: str) -> VectorIndex:
        """Read an index written by `save`; raises if the file is missing or damaged."""
        with open(path, "rb") as f:
            data = np.frombuffer(f.read(), dtype=np.uint8)
        index = cls(kind)
        loaded = faiss.deserialize_index(data)
        if loaded.d != index.dim:
            raise ValueError(f"{path}: index has dim {loaded.d}, expected {index.dim}")
        index.index = loaded
        return index


class VectorStoreIndexes:
    """The VectorIndex of every vector store in the catalogue, in memory and under `directory`.

    Each index remembers the catalogue version it reflects; one that is behind (another process
    wrote) is reloaded before it is used. A lock per store orders its index updates; `dim` is
    the embedder's, to read stored embeddings. Thread-safe.
    """

    def __init__(self, directory: str, catalogue: Catalogue, dim: int):
        self.directory = directory
        os.makedirs(directory, exist_ok=True)
        self._catalogue = catalogue
        self._dim = dim
        self._locks_lock = threading.Lock()
        self._locks: dict[str, threading.Lock] = {}
        self._indexes: dict[str, VectorIndex] = {}
        self._versions: dict[str, int] = {}  # the catalogue version each in-memory index holds

    def load_all(self) -> None:
        """Load every store's index and reconcile it with the catalogue."""
        for store_id, kind, version in self._catalogue.index_kinds():
            self._indexes[store_id] = self._load(store_id, kind)
            self._versions[store_id] = version

    def remove_orphans(self, min_age_s: float) -> None:
        """Remove files of no loaded store (a deleted store's index, a crashed save's temp file)
        once they are `min_age_s` old."""
        remove_old_files(self.directory, {f"{s}.faiss" for s in self._indexes}, min_age_s)

    def lock(self, store_id: str) -> threading.Lock:
        """The lock that orders a store's catalogue commits and index updates."""
        with self._locks_lock:
            return self._locks.setdefault(store_id, threading.Lock())

    def get(self, store_id: str) -> VectorIndex | None:
        """The in-memory index of a store, as it is (no version check)."""
        return self._indexes.get(store_id)

    def create(self, store_id: str, kind: str) -> None:
        """An empty, saved index for a store just added to the catalogue (version 0)."""
        with self.lock(store_id):
            self._indexes[store_id] = VectorIndex(kind)
            self._versions[store_id] = 0
            self._save(store_id)

    def drop(self, store_id: str) -> None:
        """Forget a deleted store's index and remove its file."""
        with self.lock(store_id):
            self._indexes.pop(store_id, None)
            self._versions.pop(store_id, None)
            unlink_quietly(self.path(store_id))

    def add(self, store_id: str, ids: np.ndarray, vectors: np.ndarray, version: int) -> None:
        """Add chunks just committed at catalogue `version` (the version before the commit);
        the caller holds the store's lock."""
        if self._versions.get(store_id) == version:
            self._indexes[store_id].add(ids, vectors)
            self._versions[store_id] = version + 1
            self._save(store_id)
        else:  # another process wrote in between: the catalogue has both
            self._reload(store_id)

    def remove(self, store_id: str, ids: np.ndarray, version: int) -> None:
        """Remove chunks just deleted at catalogue `version` (the version before the delete)."""
        with self.lock(store_id):
            index = self._indexes.get(store_id)
            if index is None:
                return
            if self._versions.get(store_id) != version:
                self._reload(store_id)
                return
            if index.supports_remove:
                index.remove(ids)
            else:
                index.reset(*self._catalogue.stored_vectors(store_id, self._dim))
            self._versions[store_id] = version + 1
            self._save(store_id)

    def search(
        self, store_id: str, version: int, queries: np.ndarray, k: int
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """VectorIndex.search on a store's index at least as new as catalogue `version`;
        None if the store is gone."""
        with self.lock(store_id):
            index = self._current(store_id, version)
            return None if index is None else index.search(queries, k)

    def size(self, store_id: str, version: int) -> int:
        """Chunks in a store's index at least as new as catalogue `version`."""
        with self.lock(store_id):
            index = self._current(store_id, version)
            return len(index) if index else 0

    def path(self, store_id: str) -> str:
        return os.path.join(self.directory, f"{store_id}.faiss")

    def _current(self, store_id: str, version: int) -> VectorIndex | None:
        """The store's index, reloaded first if the catalogue is ahead of it (versions only grow;
        an index already past `version` was updated by this process since it was read)."""
        if self._versions.get(store_id, -1) < version:
            self._reload(store_id)
        return self._indexes.get(store_id)

    def _reload(self, store_id: str) -> None:
        """Load the store's index again, reconciled with the catalogue (caller holds its lock)."""
        found = self._catalogue.index_kind(store_id)
        if found is None:
            self._indexes.pop(store_id, None)
            self._versions.pop(store_id, None)
            return
        kind, version = found
        self._indexes[store_id] = self._load(store_id, kind)
        self._versions[store_id] = version

    def _save(self, store_id: str) -> None:
        self._indexes[store_id].save(self.path(store_id))

    def _load(self, store_id: str, kind: str) -> VectorIndex:
        """Read a store's index file and bring it in line with the catalogue's chunks."""
        path = self.path(store_id)
        db_ids = self._catalogue.chunk_ids(store_id)
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
                index.add(*self._catalogue.stored_vectors(store_id, self._dim, missing))
            else:
                index.reset(*self._catalogue.stored_vectors(store_id, self._dim))
            index.save(path)
        return index
