"""Retrieved chunks in the prompt (numbered sources) and in the response (`tandem.sources`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from models.retrieval.records import SearchHit

Hit = SearchHit | Mapping[str, Any]  # a SearchHit, or its fields as a dict (e.g. after JSON)

CITE_INSTRUCTION = "Use these sources to answer. Cite each source you use as [n]."


def format_sources(hits: Sequence[Hit], instruction: str = CITE_INSTRUCTION) -> str:
    """The instruction, then one line per hit: `[n] text` (whitespace folded).

    One compact line per source is the layout the built-in toy model was trained on, and real
    chat models read it as well; filenames travel in `tandem.sources`. Empty when there are no
    hits, so a prompt without sources carries no instruction to cite.
    """
    if not hits:
        return ""
    lines = [f"[{n}] {' '.join(_field(hit, 'text').split())}" for n, hit in enumerate(hits, 1)]
    return instruction + "\n" + "\n".join(lines)


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
