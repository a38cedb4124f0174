"""`file_citation` annotations on an answer written from retrieved sources.

The prompt numbers the sources [1], [2], ... and asks the model to cite them so: each `[n]` in
the answer is a citation of source n at that index. A model that cites nothing (the built-in toy
model answers in a plain sentence) gets its sentences attributed instead: a sentence is cited to
the source that holds most of its content words (at least half of them), at the sentence's end.
"""

from __future__ import annotations

import re

MARKER = re.compile(r"\[(\d{1,3})\]")
SENTENCE = re.compile(r"[^.!?\n]+[.!?]?")
WORD = re.compile(r"[a-z0-9]+")
STOP = frozenset("a an the is are was were be to of in on at by for and or with as it its this "
                 "that he she they his her their from has have had who what where which".split())  # fmt: skip


def file_citations(text: str, sources: list[dict]) -> list[dict]:
    """Annotations {type: file_citation, index, file_id, filename} of `text`, in text order.
    `sources` are the response's sources in prompt order ([1] first): file_id, filename, text."""
    if not sources:
        return []
    cited = [(m.start(), int(m.group(1)) - 1) for m in MARKER.finditer(text)
             if 0 < int(m.group(1)) <= len(sources)]  # fmt: skip
    if not cited:
        cited = _attributed(text, sources)
    return [{"type": "file_citation", "index": index, "file_id": sources[n]["file_id"],
             "filename": sources[n]["filename"]} for index, n in cited]  # fmt: skip


def _words(text: str) -> set[str]:
    return {w for w in WORD.findall(text.lower()) if w not in STOP}


def _attributed(text: str, sources: list[dict]) -> list[tuple[int, int]]:
    """(end of sentence, source) for each sentence most of whose content words one source has."""
    held = [_words(s.get("text") or "") for s in sources]
    out = []
    for m in SENTENCE.finditer(text):
        words = _words(m.group())
        if not words:
            continue
        overlap = [len(words & h) for h in held]
        best = max(range(len(held)), key=overlap.__getitem__)
        if overlap[best] * 2 >= len(words):
            out.append((m.end(), best))
    return out
