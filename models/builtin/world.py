"""The toy world: a tiny synthetic language that small models can learn in minutes.

People, coloured objects and places; short sentences from a fixed grammar; clear positive and
negative sentiment words. Everything is generated from a seed, so training data, held-out test
prompts, steering pairs and the built-in documents are reproducible.

Task formats:
- stories: a few sentences with one mood (mostly positive or mostly negative words);
- context questions: facts in a passage, then a question answered by copying a fact sentence;
- adapter tasks `rewrite` (positive tone), `qa` (short answer), `list` (people / objects);
- steering pairs: the same sentence with a positive and a negative word.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

PEOPLE = [
    "Mia", "Leo", "Sam", "Ava", "Max", "Zoe", "Ben", "Ivy",
    "Tom", "Eva", "Noah", "Lily", "Finn", "Rosa", "Omar", "Nina",
]  # fmt: skip
OBJECTS = [
    "ball", "book", "cup", "hat", "kite", "lamp", "box", "key",
    "coin", "drum", "bell", "map", "shoe", "boat", "bag", "clock",
]  # fmt: skip
COLORS = ["red", "blue", "green", "yellow", "black", "white", "pink", "brown"]
PLACES = [
    "park", "garden", "kitchen", "school", "market", "library",
    "beach", "forest", "river", "station", "farm", "bakery",
]  # fmt: skip

# Sentiment words come in pairs: rewriting in a positive tone swaps each negative word for its
# partner, and a steering pair differs in exactly one such word.
FEELINGS = [("happy", "sad"), ("glad", "angry"), ("cheerful", "gloomy"),
            ("calm", "upset"), ("proud", "lonely"), ("joyful", "tired")]  # fmt: skip
ATTITUDES = [("loves", "hates"), ("enjoys", "dislikes"), ("likes", "fears")]
DESCRIPTIONS = [("lovely", "ugly"), ("shiny", "broken"), ("great", "awful"),
                ("nice", "dirty"), ("bright", "dull")]  # fmt: skip

POSITIVE_WORDS = frozenset(w for pairs in (FEELINGS, ATTITUDES, DESCRIPTIONS) for w, _ in pairs)
NEGATIVE_WORDS = frozenset(w for pairs in (FEELINGS, ATTITUDES, DESCRIPTIONS) for _, w in pairs)
TO_POSITIVE = {neg: pos for pairs in (FEELINGS, ATTITUDES, DESCRIPTIONS) for pos, neg in pairs}

TASKS = ("rewrite", "qa", "list")

REWRITE_PHRASINGS = [
    "Rewrite in a positive tone: {s}",
    "Make this sentence cheerful: {s}",
    "Say this more positively: {s}",
    "Turn this into a happy sentence: {s}",
    "Please rewrite this so it sounds nice: {s}",
    "Rephrase with a bright, positive mood: {s}",
]
QA_PHRASINGS = [
    "{passage}\nQuestion: {question}",
    "Based on the text, {question_lower}\n\nText: {passage}",
    "Read this: {passage}\nNow answer briefly: {question}",
    "{passage}\nGive a short answer. {question}",
    "Passage: {passage}\nQ: {question}",
]
LIST_PHRASINGS = {
    "people": [
        "List the people in: {passage}",
        "Who is mentioned here? Name them all: {passage}",
        "Name every person in this text: {passage}",
        "Give me a list of the names in: {passage}",
    ],
    "objects": [
        "Name every object mentioned: {passage}",
        "List the things in this text: {passage}",
        "Which objects appear here? {passage}",
        "Give me a list of the objects in: {passage}",
    ],
}
STORY_PHRASINGS = [
    "Tell me a story.",
    "Tell me a story about {person}.",
    "Continue the story: {start}",
    "Write a few sentences about {person}.",
    "{start}",
]
CONTEXT_PHRASINGS = [
    "{passage}\n\n{question}",
    "Use the text to answer.\n{passage}\n{question}",
    "Sources:\n{passage}\n\nAnswer using the sources. {question}",
    "{question}\nContext: {passage}",
]


@dataclass(frozen=True)
class Fact:
    """One fact sentence and the question it answers: `kind` is where / has / who."""

    person: str
    kind: str
    value: str  # place for `where`, "<color> <object>" for `has` and `who`

    @property
    def sentence(self) -> str:
        if self.kind == "where":
            return f"{self.person} is in the {self.value}."
        return f"{self.person} has the {self.value}."

    @property
    def question(self) -> str:
        if self.kind == "where":
            return f"Where is {self.person}?"
        if self.kind == "has":
            return f"What does {self.person} have?"
        return f"Who has the {self.value}?"

    @property
    def short_answer(self) -> str:
        """The one- or two-word answer the `qa` adapter gives."""
        if self.kind == "where":
            return f"In the {self.value}."
        if self.kind == "has":
            return f"The {self.value}."
        return f"{self.person}."


def _pick(rng: random.Random, pairs: list[tuple[str, str]], positive: bool) -> str:
    pos, neg = rng.choice(pairs)
    return pos if positive else neg


def _thing(rng: random.Random) -> str:
    return f"{rng.choice(COLORS)} {rng.choice(OBJECTS)}"


def mood_sentence(rng: random.Random, person: str, positive: bool) -> str:
    """A sentence carrying sentiment, positive or negative."""
    form = rng.randrange(5)
    if form == 0:
        return f"{person} feels {_pick(rng, FEELINGS, positive)}."
    if form == 1:
        return f"{person} is {_pick(rng, FEELINGS, positive)} in the {rng.choice(PLACES)}."
    if form == 2:
        target = rng.choice([f"the {rng.choice(PLACES)}", f"the {_thing(rng)}"])
        return f"{person} {_pick(rng, ATTITUDES, positive)} {target}."
    if form == 3:
        return f"The {rng.choice(PLACES)} is {_pick(rng, DESCRIPTIONS, positive)}."
    return f"The {_thing(rng)} is {_pick(rng, DESCRIPTIONS, positive)}."


def neutral_sentence(rng: random.Random, person: str, others: list[str]) -> str:
    """A sentence without sentiment: where someone is, what they have, give, walk."""
    form = rng.randrange(4)
    if form == 0:
        return f"{person} is in the {rng.choice(PLACES)}."
    if form == 1:
        return f"{person} has the {_thing(rng)}."
    other = rng.choice([p for p in others if p != person] or [p for p in PEOPLE if p != person])
    if form == 2:
        return f"{person} gives the {_thing(rng)} to {other}."
    return f"{person} and {other} walk to the {rng.choice(PLACES)}."


def story(rng: random.Random, positive: bool, n_sentences: int | None = None) -> list[str]:
    """Sentences about two or three people; sentiment sentences follow the story's mood 9 in 10."""
    n = n_sentences or rng.randint(3, 6)
    cast = rng.sample(PEOPLE, rng.randint(2, 3))
    out = []
    for _ in range(n):
        person = rng.choice(cast)
        if rng.random() < 0.6:
            out.append(mood_sentence(rng, person, positive if rng.random() < 0.9 else not positive))
        else:
            out.append(neutral_sentence(rng, person, cast))
    return out


def random_facts(rng: random.Random, n: int) -> list[Fact]:
    """n facts about distinct people (where / has), objects distinct so answers are unique."""
    people = rng.sample(PEOPLE, n)
    things = rng.sample([f"{c} {o}" for c in COLORS for o in OBJECTS], n)
    places = [rng.choice(PLACES) for _ in range(n)]
    facts = []
    for person, thing, place in zip(people, things, places, strict=True):
        if rng.random() < 0.5:
            facts.append(Fact(person, "where", place))
        else:
            facts.append(Fact(person, rng.choice(["has", "who"]), thing))
    return facts


def tokenizer_corpus(seed: int = 0, n_stories: int = 4000) -> list[str]:
    """Text the shared tokenizer is trained on: stories plus every task phrasing."""
    rng = random.Random(seed)
    lines = [" ".join(story(rng, rng.random() < 0.5)) for _ in range(n_stories)]
    for _ in range(n_stories // 4):
        facts = random_facts(rng, 3)
        passage = " ".join(f.sentence for f in facts)
        f = rng.choice(facts)
        for phr in QA_PHRASINGS + CONTEXT_PHRASINGS:
            lines.append(
                phr.format(
                    passage=passage,
                    question=f.question,
                    question_lower=f.question[0].lower() + f.question[1:],
                )  # fmt: skip
            )
        lines.append(f.short_answer)
    for phr in REWRITE_PHRASINGS + LIST_PHRASINGS["people"] + LIST_PHRASINGS["objects"]:
        for _ in range(50):
            s = " ".join(story(rng, False, 2))
            lines.append(phr.format(s=s, passage=s))
    for phr in STORY_PHRASINGS:
        for _ in range(50):
            lines.append(
                phr.format(person=rng.choice(PEOPLE), start=mood_sentence(rng, "Mia", False))
            )
    lines += ["system\n", "user\n", "assistant\n", "You are a helpful assistant.\n"] * 200
    return lines
