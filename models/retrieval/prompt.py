"""Retrieved chunks in the prompt (numbered sources) and in the response (`tandem.sources`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from models.retrieval.records import SearchHit

CITE_INSTRUCTION = (
    "Answer using the sources below. Cite each source you use as [n], its number. "
    "If the sources do not contain the answer, say so."
)


def format_sources(hits: Sequence[SearchHit], instruction: str = CITE_INSTRUCTION) -> str:
    """The instruction, then each hit numbered [1], [2], … with its filename and text.

    Empty when there are no hits, so a prompt without sources carries no instruction to cite.
    """
    if not hits:
        return ""
    blocks = [f"[{n}] ({hit.filename})\n{hit.text.strip()}" for n, hit in enumerate(hits, 1)]
    return instruction + "\n\n" + "\n\n".join(blocks)


def sources_for_response(hits: Sequence[SearchHit]) -> list[dict[str, Any]]:
    """The hits as the response's `tandem.sources`, in citation order ([1] first)."""
    return [
        {
            "id": hit.chunk_id,
            "file_id": hit.file_id,
            "filename": hit.filename,
            "score": round(float(hit.score), 6),
            "text": hit.text,
        }
        for hit in hits
    ]
