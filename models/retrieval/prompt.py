"""Retrieved chunks in the prompt (numbered sources) and in the response (`tandem.sources`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from models.retrieval.records import SearchHit

Hit = SearchHit | Mapping[str, Any]  # a SearchHit, or its fields as a dict (e.g. after JSON)

CITE_INSTRUCTION = (
    "Answer using the sources below. Cite each source you use as [n], its number. "
    "If the sources do not contain the answer, say so."
)


def format_sources(hits: Sequence[Hit], instruction: str = CITE_INSTRUCTION) -> str:
    """The instruction, then each hit numbered [1], [2], … with its filename and text.

    Empty when there are no hits, so a prompt without sources carries no instruction to cite.
    """
    if not hits:
        return ""
    blocks = [
        f"[{n}] ({_field(hit, 'filename')})\n{_field(hit, 'text').strip()}"
        for n, hit in enumerate(hits, 1)
    ]
    return instruction + "\n\n" + "\n\n".join(blocks)


def sources_for_response(hits: Sequence[Hit]) -> list[dict[str, Any]]:
    """The hits as the response's `tandem.sources`, in citation order ([1] first)."""
    return [
        {
            "id": _field(hit, "chunk_id"),
            "file_id": _field(hit, "file_id"),
            "filename": _field(hit, "filename"),
            "score": round(float(_field(hit, "score")), 6),
            "text": _field(hit, "text"),
        }
        for hit in hits
    ]


def _field(hit: Hit, name: str) -> Any:
    if isinstance(hit, Mapping):
        return hit["id"] if name == "chunk_id" and "chunk_id" not in hit else hit[name]
    return getattr(hit, name)
