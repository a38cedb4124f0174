"""OpenAI vector-store search `filters` on file attributes: comparison filters
`{"type": "eq"|"ne"|"gt"|"gte"|"lt"|"lte"|"in"|"nin", "key", "value"}` and compound filters
`{"type": "and"|"or", "filters": [...]}`, nested."""

from __future__ import annotations

import operator
from typing import Any

from models.retrieval.errors import InvalidRequest

COMPARISONS = {"eq": operator.eq, "ne": operator.ne, "gt": operator.gt, "gte": operator.ge,
               "lt": operator.lt, "lte": operator.le}  # fmt: skip
MAX_DEPTH = 8


def check_filter(f: Any, depth: int = 0) -> None:
    """InvalidRequest(param="filters") for a filter that is not one of the shapes above."""
    if depth > MAX_DEPTH or not isinstance(f, dict):
        raise InvalidRequest("a filter is an object nested at most 8 deep", param="filters")
    kind = f.get("type")
    if kind in ("and", "or"):
        if set(f) != {"type", "filters"} or not isinstance(f["filters"], list) or not f["filters"]:
            raise InvalidRequest(f"a compound '{kind}' filter has a non-empty 'filters' list only",
                                 param="filters")  # fmt: skip
        for sub in f["filters"]:
            check_filter(sub, depth + 1)
    elif kind in COMPARISONS or kind in ("in", "nin"):
        if set(f) != {"type", "key", "value"} or not isinstance(f["key"], str):
            raise InvalidRequest(f"a '{kind}' filter has exactly 'type', 'key' and 'value'",
                                 param="filters")  # fmt: skip
        scalar = (str, int, float, bool)
        ok = isinstance(f["value"], list) and all(isinstance(v, scalar) for v in f["value"]) \
            if kind in ("in", "nin") else isinstance(f["value"], scalar)
        if not ok:
            raise InvalidRequest(f"the value of a '{kind}' filter must be "
                                 f"{'a list of ' if kind in ('in', 'nin') else 'a '}string, "
                                 "number or boolean", param="filters")  # fmt: skip
    else:
        raise InvalidRequest(f"unknown filter type {kind!r}; use eq, ne, gt, gte, lt, lte, in, "
                             "nin, and, or", param="filters")  # fmt: skip


def matches(f: dict[str, Any] | None, attributes: dict[str, Any]) -> bool:
    """Whether a file's attributes pass the filter (None passes all). A missing key, or values
    that do not compare (a string against a number), fail a comparison."""
    if f is None:
        return True
    kind = f["type"]
    if kind == "and":
        return all(matches(sub, attributes) for sub in f["filters"])
    if kind == "or":
        return any(matches(sub, attributes) for sub in f["filters"])
    if f["key"] not in attributes:
        return False
    value = attributes[f["key"]]
    if kind in ("in", "nin"):
        return (value in f["value"]) == (kind == "in")
    try:
        return bool(COMPARISONS[kind](value, f["value"]))
    except TypeError:
        return False
