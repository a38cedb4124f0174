"""One FAISS index per vector store, persisted atomically.

Vectors are L2-normalised, so inner product is cosine similarity. `flat` is exact
(IndexIDMap2 over IndexFlatIP); `hnsw` is approximate and faster at large sizes. FAISS ids are
the chunks' SQLite row ids, so the index and the database can be reconciled after a crash.
"""

from __future__ import annotations

import os
import tempfile

import faiss
import numpy as np

from models.embedding import EMBEDDING_DIM

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
        data = faiss.serialize_index(self.index)
        directory = os.path.dirname(path) or "."
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".faiss", dir=directory)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data.tobytes())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

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
