"""A response's speculative-decoding report (`tandem.speculative`, `tandem.unspeculated_because`)
from its choices' last outputs (RequestOutput.speculation) and their "speculation_off"
interventions (a row the engine could not speculate exactly, and why)."""

from __future__ import annotations

from typing import Any


def speculation_fields(choices: list[Any]) -> dict[str, Any]:
    """{"speculative": {"k", "proposed", "accepted"} over the speculated choices or None,
    "unspeculated_because": [{"index", "reason"}] or None}; choices are ChoiceStreams."""
    stats = [c.speculation for c in choices if getattr(c, "speculation", None) is not None]
    speculative = None
    if stats:
        speculative = {"k": max(s.k for s in stats), "proposed": sum(s.proposed for s in stats),
                       "accepted": sum(s.accepted for s in stats)}  # fmt: skip
    off = [
        {"index": i, "reason": iv.detail.get("reason", "")}
        for i, c in enumerate(choices) for iv in c.interventions if iv.action == "speculation_off"
    ]  # fmt: skip
    return {"speculative": speculative, "unspeculated_because": off or None}
