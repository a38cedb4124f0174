"""Split text into chunks the embedder reads whole.

all-MiniLM-L6-v2 reads at most 256 word pieces including [CLS] and [SEP], so chunk sizes are
counted with its own tokenizer and capped at 254 pieces of text. Two strategies, as in OpenAI's
API: `static` cuts fixed windows of `max_chunk_size_tokens` with `chunk_overlap_tokens` overlap;
`auto` packs whole sentences (cutting a sentence only when it alone is too long) and overlaps by
whole trailing sentences.
"""

from __future__ import annotations

import bisect
import re
from typing import Any, Literal

from pydantic import BaseModel, Field

from models.embedding import MAX_WORD_PIECES
from models.retrieval.errors import InvalidRequest

MIN_CHUNK_TOKENS = 16
MAX_TEXT_PIECES = MAX_WORD_PIECES - 2  # [CLS] and [SEP] take two of the 256

_SENTENCE_END = re.compile(r"(?<=[.!?;:])\s+|\n+")


class ChunkingStrategy(BaseModel):
    """A resolved chunking strategy: what was asked and the sizes used, in word pieces."""

    type: Literal["auto", "static", "other"] = Field(
        description="auto: sentence-aware; static: windows; other: chunked outside this store."
    )
    max_chunk_size_tokens: int = Field(description="Largest chunk, in embedder word pieces.")
    chunk_overlap_tokens: int = Field(description="Word pieces shared by neighbouring chunks.")

    def to_openai(self) -> dict[str, Any]:
        """The `chunking_strategy` object of a vector store file (auto reports its sizes)."""
        if self.type == "other":
            return {"type": "other"}
        return {
            "type": "static",
            "static": {
                "max_chunk_size_tokens": self.max_chunk_size_tokens,
                "chunk_overlap_tokens": self.chunk_overlap_tokens,
            },
        }


def resolve_chunking_strategy(
    param: dict[str, Any] | None, default_max_tokens: int, default_overlap_tokens: int
) -> ChunkingStrategy:
    """Validate an OpenAI `chunking_strategy` parameter; None or `auto` uses the defaults."""
    if param is None or param.get("type", "auto") == "auto":
        return ChunkingStrategy(
            type="auto",
            max_chunk_size_tokens=min(default_max_tokens, MAX_WORD_PIECES),
            chunk_overlap_tokens=min(default_overlap_tokens, default_max_tokens // 2),
        )
    if param.get("type") != "static":
        raise InvalidRequest(
            f"chunking_strategy.type must be 'auto' or 'static', not {param.get('type')!r}",
            param="chunking_strategy.type",
        )
    static = param.get("static") or {}
    size, overlap = static.get("max_chunk_size_tokens"), static.get("chunk_overlap_tokens")
    if not isinstance(size, int) or not MIN_CHUNK_TOKENS <= size <= MAX_WORD_PIECES:
        raise InvalidRequest(
            f"chunking_strategy.static.max_chunk_size_tokens must be an integer from "
            f"{MIN_CHUNK_TOKENS} to {MAX_WORD_PIECES} (the embedder all-MiniLM-L6-v2 reads at "
            f"most {MAX_WORD_PIECES} word pieces), got {size!r}",
            param="chunking_strategy.static.max_chunk_size_tokens",
        )
    if not isinstance(overlap, int) or not 0 <= overlap <= size // 2:
        raise InvalidRequest(
            f"chunking_strategy.static.chunk_overlap_tokens must be an integer from 0 to half of "
            f"max_chunk_size_tokens ({size // 2}), got {overlap!r}",
            param="chunking_strategy.static.chunk_overlap_tokens",
        )
    return ChunkingStrategy(type="static", max_chunk_size_tokens=size, chunk_overlap_tokens=overlap)


def chunk_text(text: str, tokenizer: Any, strategy: ChunkingStrategy) -> list[str]:
    """Chunks of `text`, each at most the strategy's size in `tokenizer`'s word pieces."""
    spans = _token_spans(text, tokenizer)
    if not spans:
        return []
    size = min(strategy.max_chunk_size_tokens, MAX_TEXT_PIECES)
    overlap = min(strategy.chunk_overlap_tokens, size // 2)
    if strategy.type == "static":
        ranges = _windows(0, len(spans), size, overlap)
    else:
        ranges = _sentence_packs(text, spans, size, overlap)
    chunks = [text[spans[a][0] : spans[b - 1][1]].strip() for a, b in ranges]
    return [c for c in chunks if c]


def _token_spans(text: str, tokenizer: Any) -> list[tuple[int, int]]:
    """Character (start, end) of every word piece of `text`."""
    enc = tokenizer(
        text, add_special_tokens=False, return_offsets_mapping=True, verbose=False, truncation=False
    )
    return [tuple(span) for span in enc["offset_mapping"] if span[1] > span[0]]


def _windows(start: int, end: int, size: int, overlap: int) -> list[tuple[int, int]]:
    """Token ranges [a, b) of `size` covering [start, end), consecutive ones sharing `overlap`."""
    ranges, a = [], start
    while True:
        b = min(a + size, end)
        ranges.append((a, b))
        if b >= end:
            return ranges
        a = b - overlap


def _sentence_packs(
    text: str, spans: list[tuple[int, int]], size: int, overlap: int
) -> list[tuple[int, int]]:
    """Token ranges made of whole sentences, overlapping by whole trailing sentences."""
    starts = [s for s, _ in spans]
    sentences = []  # token ranges [a, b) of each sentence
    for m_start, m_end in _sentence_char_spans(text):
        a, b = bisect.bisect_left(starts, m_start), bisect.bisect_left(starts, m_end)
        if b > a:
            sentences.append((a, b))
    ranges: list[tuple[int, int]] = []
    current: list[tuple[int, int]] = []
    for a, b in sentences:
        if b - a > size:  # one sentence longer than a chunk: flush, then cut it in windows
            if current:
                ranges.append((current[0][0], current[-1][1]))
            ranges.extend(_windows(a, b, size, overlap))
            current = []
            continue
        if current and b - current[0][0] > size:
            ranges.append((current[0][0], current[-1][1]))
            current = _overlap_tail(current, overlap, size - (b - a))
        current.append((a, b))
    if current:
        ranges.append((current[0][0], current[-1][1]))
    return ranges


def _overlap_tail(sentences: list[tuple[int, int]], overlap: int, room: int) -> list:
    """The trailing sentences of a chunk that fit in `overlap` (and leave room for the next)."""
    tail: list[tuple[int, int]] = []
    budget = min(overlap, room)
    for a, b in reversed(sentences):
        if sentences[-1][1] - a > budget:
            break
        tail.insert(0, (a, b))
    return tail


def _sentence_char_spans(text: str) -> list[tuple[int, int]]:
    """Character spans of sentences (split after . ! ? ; : and at line breaks)."""
    spans, pos = [], 0
    for m in _SENTENCE_END.finditer(text):
        if m.start() > pos:
            spans.append((pos, m.start()))
        pos = m.end()
    if pos < len(text):
        spans.append((pos, len(text)))
    return spans
