"""Retrieval settings (the `retrieval:` block of the config)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class RetrievalConfig(BaseModel):
    """Where documents live and how they are chunked and searched."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(
        True,
        description="Run the Retriever: documents, vector stores, RAG and embeddings. false "
        "leaves the deployment (and its embedder) out; those routes then answer 404.",
    )
    data_dir: str = Field(
        "~/.cache/tandem/retrieval",
        description="Directory for files, FAISS indexes and the SQLite database (persists).",
    )
    max_file_bytes: int = Field(
        20 * 1024 * 1024, ge=1, description="Largest upload accepted (413 beyond)."
    )
    chunk_max_tokens: int = Field(
        200, ge=16, le=256, description="Default chunk size in embedder word pieces."
    )
    chunk_overlap_tokens: int = Field(40, ge=0, description="Default overlap between chunks.")
    index: Literal["flat", "hnsw"] = Field(
        "flat", description="FAISS index kind per store: flat (exact IP) or hnsw."
    )
    default_vector_store_ids: list[str] = Field(
        default_factory=list, description="Stores every chat request searches when it names none."
    )
    default_top_k: int = Field(4, ge=1, le=50, description="Chunks put into the prompt.")
    builtin_documents: bool = Field(
        True, description="Create the built-in vector store of world documents on first start."
    )
    threads: int = Field(
        0,
        ge=0,
        description="torch and FAISS threads in the Retriever replica; 0 = OMP_NUM_THREADS or 1.",
    )
