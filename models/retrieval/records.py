"""What the document store returns: plain dataclasses that pickle through Ray handles and
render themselves as the objects the OpenAI SDK parses (`to_openai`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class FileRecord:
    """An uploaded file (its bytes are kept on disk)."""

    id: str
    filename: str
    bytes: int
    created_at: int
    purpose: str

    def to_openai(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "file",
            "bytes": self.bytes,
            "created_at": self.created_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
            "expires_at": None,
            "status_details": None,
        }


@dataclass(frozen=True)
class VectorStoreRecord:
    """A vector store: a named set of files, chunked and indexed together."""

    id: str
    name: str
    created_at: int
    last_active_at: int
    metadata: dict[str, str]
    file_counts: dict[str, int]
    usage_bytes: int
    index_kind: str

    @property
    def status(self) -> str:
        return "in_progress" if self.file_counts.get("in_progress") else "completed"

    def to_openai(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "vector_store",
            "created_at": self.created_at,
            "last_active_at": self.last_active_at,
            "name": self.name,
            "metadata": self.metadata,
            "file_counts": self.file_counts,
            "status": self.status,
            "usage_bytes": self.usage_bytes,
            "expires_after": None,
            "expires_at": None,
        }


@dataclass(frozen=True)
class VectorStoreFileRecord:
    """A file attached to a vector store, with how it was chunked."""

    id: str  # the file id, as in OpenAI's API
    vector_store_id: str
    created_at: int
    status: str
    usage_bytes: int
    chunk_count: int
    chunking_strategy: dict[str, Any]
    attributes: dict[str, Any] = field(default_factory=dict)
    last_error: dict[str, str] | None = None

    def to_openai(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "vector_store.file",
            "created_at": self.created_at,
            "vector_store_id": self.vector_store_id,
            "status": self.status,
            "usage_bytes": self.usage_bytes,
            "last_error": self.last_error,
            "chunking_strategy": self.chunking_strategy,
            "attributes": self.attributes,
        }


@dataclass(frozen=True)
class SearchHit:
    """One retrieved chunk: where it came from, its cosine similarity and its text."""

    chunk_id: str
    vector_store_id: str
    file_id: str
    filename: str
    score: float
    text: str
    attributes: dict[str, Any] = field(default_factory=dict)

    def to_openai(self) -> dict[str, Any]:
        """One result of `vector_stores.search`."""
        return {
            "file_id": self.file_id,
            "filename": self.filename,
            "score": self.score,
            "attributes": self.attributes,
            "content": [{"type": "text", "text": self.text}],
        }
