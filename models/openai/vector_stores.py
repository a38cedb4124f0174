"""OpenAI Vector Stores request bodies: create a store, attach a file or a file batch, search.

The routes are in deployments/files_api.py and deployments/file_batches_api.py; what they do is
models/retrieval's. Unknown fields are 400s naming them (`extra="forbid"`), as OpenAI answers.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from models.openai.errors import OpenAIError


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


class FileBatchFile(BaseModel):
    """One file of a file batch, with its own attributes and chunking strategy."""

    model_config = ConfigDict(extra="forbid")

    file_id: str
    chunking_strategy: dict[str, Any] | None = None
    attributes: dict[str, str | float | bool] | None = None


class VectorStoreFileBatchCreate(BaseModel):
    """Body of POST /v1/vector_stores/{id}/file_batches: `file_ids` (sharing `attributes` and
    `chunking_strategy`) or `files` (each its own), not both."""

    model_config = ConfigDict(extra="forbid")

    file_ids: list[str] | None = Field(None, min_length=1, max_length=500)
    files: list[FileBatchFile] | None = Field(None, min_length=1, max_length=500)
    chunking_strategy: dict[str, Any] | None = None
    attributes: dict[str, str | float | bool] | None = None

    @model_validator(mode="after")
    def _one_list(self):
        if (self.file_ids is None) == (self.files is None):
            raise ValueError("give file_ids or files, not both")
        if self.files is not None and (self.attributes or self.chunking_strategy):
            raise ValueError("with files, attributes and chunking_strategy go in each file")
        return self

    def file_list(self) -> list[dict[str, Any]]:
        """Each file with its attributes and chunking strategy."""
        if self.files is not None:
            return [f.model_dump() for f in self.files]
        return [{"file_id": f, "attributes": self.attributes,
                 "chunking_strategy": self.chunking_strategy} for f in self.file_ids or []]  # fmt: skip


class RankingOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ranker: str | None = None
    score_threshold: float = Field(0.0, ge=0.0, le=1.0)


class VectorStoreSearch(BaseModel):
    """Body of POST /v1/vector_stores/{id}/search (query rewriting is not served; filters are
    checked where they are applied, models.retrieval.filters)."""

    model_config = ConfigDict(extra="forbid")

    query: str | list[str]
    max_num_results: int = Field(10, ge=1, le=50)
    ranking_options: RankingOptions = Field(default_factory=RankingOptions)
    rewrite_query: bool = False
    filters: dict[str, Any] | None = None

    def refuse_unserved_options(self) -> None:
        """400 for the options this server accepts in the schema but cannot honour."""
        if self.rewrite_query:
            raise OpenAIError(
                "query rewriting is not supported by this server; set rewrite_query to false",
                400, param="rewrite_query", code="unsupported_parameter",
            )
