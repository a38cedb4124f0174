"""Checks on toy-world text: grammar, sentiment, right answers, and the adapter task checkers."""

from __future__ import annotations

import re

from models.builtin.world import (
    ATTITUDES,
    COLORS,
    DESCRIPTIONS,
    FEELINGS,
    NEGATIVE_WORDS,
    OBJECTS,
    PEOPLE,
    PLACES,
    POSITIVE_WORDS,
    TASKS,
)


def _alt(words) -> str:
    return "(?:" + "|".join(sorted(words, key=len, reverse=True)) + ")"


_N, _P, _C, _O = _alt(PEOPLE), _alt(PLACES), _alt(COLORS), _alt(OBJECTS)
_F = _alt([w for pair in FEELINGS for w in pair])
_A = _alt([w for pair in ATTITUDES for w in pair])
_D = _alt([w for pair in DESCRIPTIONS for w in pair])
_THING = f"{_C} {_O}"
_TEMPLATES = [
    f"{_N} is in the {_P}",
    f"{_N} has the {_THING}",
    f"{_N} feels {_F}",
    f"{_N} is {_F} in the {_P}",
    f"{_N} {_A} the (?:{_P}|{_THING})",
    f"The (?:{_P}|{_THING}) is {_D}",
    f"{_N} gives the {_THING} to {_N}",
    f"{_N} and {_N} walk to the {_P}",
]
_SENTENCE = re.compile("(?:" + "|".join(_TEMPLATES) + r")\.")
_WORD = re.compile(r"[A-Za-z]+")


def split_sentences(text: str) -> list[str]:
    """Sentences of a text (each ends with a full stop); a trailing fragment is kept last."""
    parts = re.split(r"(?<=\.)\s+", text.strip())
    return [p for p in parts if p]


def complete_sentences(text: str) -> list[str]:
    """The sentences of a (possibly truncated) generation, dropping a trailing fragment."""
    return [s for s in split_sentences(text) if s.endswith(".")]


def is_valid_sentence(sentence: str) -> bool:
    """Does the sentence follow the toy grammar exactly?"""
    return _SENTENCE.fullmatch(sentence.strip()) is not None


def is_valid_text(text: str) -> bool:
    """Is every sentence of the text (at least one) grammatical?"""
    sentences = split_sentences(text)
    return bool(sentences) and all(is_valid_sentence(s) for s in sentences)


def sentiment(text: str) -> int:
    """Positive words minus negative words."""
    words = _WORD.findall(text)
    return sum(w in POSITIVE_WORDS for w in words) - sum(w in NEGATIVE_WORDS for w in words)


def answer_is_right(key: str, output: str) -> bool:
    """Does the first sentence of `output` name the answer `key` (e.g. "park", "red kite")?"""
    first = (split_sentences(output) or [""])[0]
    return re.search(rf"\b{re.escape(key)}\b", first, flags=re.IGNORECASE) is not None


def _normal(text: str) -> str:
    return " ".join(_WORD.findall(text.lower()))


def _items(text: str) -> set[str]:
    text = re.sub(r"^\s*(?:people|objects)\s*:", "", text.strip(), flags=re.IGNORECASE)
    return {_normal(item) for item in text.rstrip(".").split(",") if item.strip()}


def _skeleton(text: str) -> str:
    return " ".join("*" if w in POSITIVE_WORDS | NEGATIVE_WORDS else w for w in _WORD.findall(text))


def check_task(task: str, reference: str, output: str) -> bool:
    """Does `output` do the adapter task whose reference answer is `reference`?

    rewrite: grammatical, no negative word, same sentence as the reference but for sentiment words;
    qa: the short answer (e.g. "In the park.", "Mia.", "Feels sad."), case and punctuation aside;
    list: the same set of comma-separated names or objects ("People: Mia, Leo.").
    """
    output = output.strip()
    if task == "rewrite":
        return (
            is_valid_text(output)
            and not any(w in NEGATIVE_WORDS for w in _WORD.findall(output))
            and _skeleton(output) == _skeleton(reference)
        )
    if task == "qa":
        return _normal(output) == _normal(reference)
    if task == "list":
        return _items(output) == _items(reference)
    raise ValueError(f"unknown task '{task}'; tasks: {', '.join(TASKS)}")
