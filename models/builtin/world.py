"""The toy world: a tiny synthetic language that small models can learn in minutes.

People, coloured objects and places; short sentences from a fixed grammar; clear positive and
negative sentiment words. Everything is generated from a seed, so training data, held-out test
prompts, steering pairs and the built-in documents are reproducible.

Task formats:
- stories: a few sentences with one mood (mostly positive or mostly negative words);
- context questions: facts in a passage, or documents like the built-in ones (one per person,
  one per place), then a question answered by copying a fact sentence;
- adapter tasks `rewrite` (positive tone), `qa` (short answer to a question without a rival
  fact of its kind in the passage), `list` (people / objects);
- steering pairs: the same sentence with a positive and a negative word.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from models.retrieval.prompt import CITE_INSTRUCTION

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

# How a system message of sources opens: the plain form, and the serving layer's (it asks for
# citations, which the toy model does not give).
SOURCE_INSTRUCTIONS = ["Use these sources to answer.", CITE_INSTRUCTION]

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


Message = dict[str, str]


def _lower_first(s: str) -> str:
    return s[0].lower() + s[1:]


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


def story(
    rng: random.Random,
    positive: bool,
    n_sentences: int | None = None,
    consistency: float = 0.92,
    cast: list[str] | None = None,
    mood_share: float = 0.8,
    drift: bool = True,
) -> list[str]:
    """Sentences about two or three people: `mood_share` of them carry sentiment, and each of
    those keeps the current mood with probability `consistency`. With `drift` a change of mood
    lasts (the mood is that of the latest sentiment sentence), so one cheerful sentence turns
    the rest of the story; without it, moods return to the story's own."""
    n = n_sentences or rng.randint(3, 6)
    cast = cast or rng.sample(PEOPLE, rng.randint(2, 3))
    out = []
    mood = positive
    for _ in range(n):
        person = rng.choice(cast)
        if rng.random() < mood_share:
            keep = rng.random() < consistency
            sentence_mood = mood if keep else not mood
            out.append(mood_sentence(rng, person, sentence_mood))
            mood = sentence_mood if drift else positive
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
    lines = [
        " ".join(story(rng, rng.random() < 0.5, consistency=0.9, mood_share=0.6, drift=False))
        for _ in range(n_stories)
    ]
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
            s = " ".join(story(rng, False, 2, consistency=0.9, mood_share=0.6, drift=False))
            lines.append(phr.format(s=s, passage=s))
    for phr in STORY_PHRASINGS:
        for _ in range(50):
            lines.append(
                phr.format(person=rng.choice(PEOPLE), start=mood_sentence(rng, "Mia", False))
            )
    lines += ["system\n", "user\n", "assistant\n", "You are a helpful assistant.\n"] * 200
    return lines


@dataclass(frozen=True)
class Question:
    """A question about a passage: `key` are the words a right answer must name."""

    kind: str  # where / has / who / feel
    text: str
    key: str  # place, "<color> <object>", person, or feeling
    sentence: str  # the passage sentence that answers it (what the base model copies)

    @property
    def short_answer(self) -> str:
        """The one- or two-word answer the `qa` adapter gives."""
        if self.kind == "where":
            return f"In the {self.key}."
        if self.kind == "has":
            return f"The {self.key}."
        if self.kind == "feel":
            return f"Feels {self.key}."
        return f"{self.key}."


def passage_with_questions(rng: random.Random) -> tuple[list[str], list[Question]]:
    """A passage of 2-8 sentences about 2-4 people and the questions it answers uniquely."""
    cast = rng.sample(PEOPLE, rng.randint(2, 4))
    things = rng.sample([f"{c} {o}" for c in COLORS for o in OBJECTS], len(cast))
    sentences, questions = [], []
    for person, thing in zip(cast, things, strict=True):
        for kind in rng.sample(["where", "has", "feel"], rng.randint(1, 2)):
            if kind == "where":
                place = rng.choice(PLACES)
                s = f"{person} is in the {place}."
                questions.append(Question("where", f"Where is {person}?", place, s))
            elif kind == "has":
                s = f"{person} has the {thing}."
                questions.append(Question("has", f"What does {person} have?", thing, s))
                questions.append(Question("who", f"Who has the {thing}?", person, s))
            else:
                feeling = rng.choice([w for pair in FEELINGS for w in pair])
                s = f"{person} feels {feeling}."
                questions.append(Question("feel", f"How does {person} feel?", feeling, s))
            sentences.append(s)
    rng.shuffle(sentences)
    if rng.random() < 0.5:
        place_mood = f"The {rng.choice(PLACES)} is {_pick(rng, DESCRIPTIONS, rng.random() < 0.5)}."
        sentences.insert(rng.randrange(len(sentences) + 1), place_mood)
    return sentences, questions


def has_rival(q: Question, text: str) -> bool:
    """Does `text` state another person's fact of the kind that a question keyed by a person
    asks ("Mia feels sad." for "How does Tom feel?")? Such a question needs the fact looked up
    by the person, not only by its kind. "Who has the <thing>?" is keyed by a distinct thing,
    so it has no rival."""
    verb = {"where": "is in the", "has": "has the", "feel": "feels"}.get(q.kind)
    person = q.sentence.split()[0]
    return verb is not None and any(f"{p} {verb} " in text for p in PEOPLE if p != person)


def qa_question(rng: random.Random, rival: bool = False) -> tuple[str, Question]:
    """A passage (other people and kinds of fact stay in it as distractors) and a question
    about it of a kind drawn evenly: without a rival fact of the asked kind (the `qa` task),
    or with `rival` only questions that have one. Binding a fact to its person among rivals
    is beyond the toy model (chance level, bench/results/quality.json), so the task leaves
    it out and the benchmark reports it apart."""
    kind = rng.choice(["where", "has", "feel"] if rival else ["where", "has", "who", "feel"])
    while True:
        sentences, questions = passage_with_questions(rng)
        passage = " ".join(sentences)
        questions = [q for q in questions if q.kind == kind and has_rival(q, passage) == rival]
        if questions:
            return passage, rng.choice(questions)


def qa_prompt(rng: random.Random, rival: bool = False) -> tuple[str, str]:
    """A `qa` user prompt and its short answer; `rival` as in qa_question."""
    passage, q = qa_question(rng, rival)
    prompt = rng.choice(QA_PHRASINGS).format(
        passage=passage, question=q.text, question_lower=_lower_first(q.text)
    )
    return prompt, q.short_answer


def sources_block(passages: list[str]) -> str:
    """Retrieved passages as numbered sources, one per line: `[1] ...`."""
    return "\n".join(f"[{i}] {p}" for i, p in enumerate(passages, 1))


def context_prompt(passages: list[str], question: str) -> str:
    """The retrieval prompt the toy base model was trained on: numbered sources, then the question."""
    return f"Sources:\n{sources_block(passages)}\n\nAnswer using the sources. {question}"


def _ask_with_sources(
    rng: random.Random, parts: list[str], question: str, instruction: str = SOURCE_INSTRUCTIONS[0]
) -> list[Message]:
    """Chat messages asking `question` about the source texts `parts`, in one of four layouts:
    the retrieval prompt, a system message of sources (`instruction` first, as the serving
    layer sends them), or a free phrasing around the joined texts."""
    style = rng.randrange(4)
    if style == 0:
        return [{"role": "user", "content": context_prompt(parts, question)}]
    if style == 1:
        system = f"{instruction}\n{sources_block(parts)}"
        return [{"role": "system", "content": system}, {"role": "user", "content": question}]
    phr = CONTEXT_PHRASINGS[rng.randrange(len(CONTEXT_PHRASINGS))]
    return [{"role": "user", "content": phr.format(passage=" ".join(parts), question=question)}]


def context_question(rng: random.Random) -> tuple[list[Message], str, Question]:
    """Chat messages asking a question about a passage; the answer copies the fact sentence."""
    sentences, questions = passage_with_questions(rng)
    q = rng.choice(questions)
    if rng.random() < 0.5:
        cut = sorted(rng.sample(range(1, len(sentences)), min(2, len(sentences) - 1)))
        parts = [
            " ".join(sentences[a:b]) for a, b in zip([0, *cut], [*cut, len(sentences)], strict=True)
        ]
    else:
        parts = [" ".join(sentences)]
    return _ask_with_sources(rng, parts, q.text), q.sentence, q


def document_question(rng: random.Random) -> tuple[list[Message], str, Question]:
    """A question about documents laid out like world_documents() (one per person, one per
    place) of a random small world, asked with 1-3 of them as sources; the answer copies the
    fact sentence. Teaches copying past same-person distractors ("Ivy loves the bakery.")."""
    people = random_people(rng, rng.sample(PEOPLE, rng.randint(2, 5)))
    target = people[0]
    kind = rng.choice(["where", "has", "who", "feel"])
    if kind == "where" and rng.random() < 0.3:  # the place's document alone answers it too
        docs = [place_document(rng, target.place, people)]
    else:
        docs = [person_document(target)]
    others = [person_document(p) for p in people[1:]]
    others += [
        place_document(rng, place, people) for place in dict.fromkeys(p.place for p in people)
    ]
    docs += [d for d in rng.sample(others, min(len(others), rng.randint(0, 2))) if d not in docs]
    rng.shuffle(docs)
    if kind == "where":
        q = Question("where", f"Where is {target.name}?", target.place,
                     f"{target.name} is in the {target.place}.")  # fmt: skip
    elif kind == "feel":
        q = Question("feel", f"How does {target.name} feel?", target.feeling,
                     f"{target.name} feels {target.feeling}.")  # fmt: skip
    else:
        s = f"{target.name} has the {target.thing}."
        q = (Question("has", f"What does {target.name} have?", target.thing, s) if kind == "has"
             else Question("who", f"Who has the {target.thing}?", target.name, s))  # fmt: skip
    messages = _ask_with_sources(rng, docs, q.text, rng.choice(SOURCE_INSTRUCTIONS))
    return messages, q.sentence, q


def rewrite_positive(text: str) -> str:
    """The text with every negative word swapped for its positive partner."""
    return " ".join(TO_POSITIVE.get(w.rstrip("."), w.rstrip(".")) + ("." if w.endswith(".") else "")
                    for w in text.split())  # fmt: skip


def _negative_text(rng: random.Random) -> str:
    """One or two sentences, at least one of them negative."""
    cast = rng.sample(PEOPLE, 2)
    sentences = [mood_sentence(rng, rng.choice(cast), False)]
    if rng.random() < 0.5:
        other = rng.choice([mood_sentence, lambda r, p, _: neutral_sentence(r, p, cast)])
        sentences.insert(rng.randrange(2), other(rng, rng.choice(cast), False))
    return " ".join(sentences)


def _mentions(text: str, vocabulary: list[str]) -> list[str]:
    seen: list[str] = []
    for word in text.replace(".", " ").split():
        if word in vocabulary and word not in seen:
            seen.append(word)
    return seen


def sample_task_prompt(task: str, rng: random.Random) -> tuple[str, str]:
    """A user prompt for an adapter task (`rewrite`, `qa`, `list`) and its reference answer.
    `qa` asks only questions without a rival fact of the asked kind (qa_question): binding a
    fact to its person among rivals is beyond the toy model (bench/results/quality.json)."""
    if task == "rewrite":
        text = _negative_text(rng)
        return rng.choice(REWRITE_PHRASINGS).format(s=text), rewrite_positive(text)
    if task == "qa":
        return qa_prompt(rng)
    if task == "list":
        what = rng.choice(["people", "objects"])
        while True:
            text = " ".join(story(rng, rng.random() < 0.5, rng.randint(2, 4)))
            items = _mentions(text, PEOPLE if what == "people" else OBJECTS)
            if items:
                break
        answer = f"{what.capitalize()}: {', '.join(items)}."  # "Objects: key, box."
        return rng.choice(LIST_PHRASINGS[what]).format(passage=text), answer
    raise ValueError(f"unknown task '{task}'; tasks: {', '.join(TASKS)}")


def story_chat(rng: random.Random, positive: bool) -> tuple[list[Message], str]:
    """A chat asking for a story (or its continuation) and the story that answers it."""
    sentences = story(rng, positive, rng.randint(4, 7))
    style = rng.randrange(4)
    if style == 0:
        return [{"role": "user", "content": "Tell me a story."}], " ".join(sentences)
    if style == 1:
        person = (_mentions(" ".join(sentences), PEOPLE) or [rng.choice(PEOPLE)])[0]
        ask = rng.choice(["Tell me a story about {p}.", "Write a few sentences about {p}."])
        return [{"role": "user", "content": ask.format(p=person)}], " ".join(sentences)
    cut = rng.randint(1, 2)
    start, rest = " ".join(sentences[:cut]), " ".join(sentences[cut:])
    ask = "Continue the story: {s}" if style == 2 else "{s}"
    return [{"role": "user", "content": ask.format(s=start)}], rest


def mood_prompts(n: int, positive: bool, seed: int = 1) -> list[str]:
    """n story openings of two sentences that both carry the given mood (steering test prompts)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        cast = rng.sample(PEOPLE, 2)
        out.append(" ".join(mood_sentence(rng, p, positive) for p in cast))
    return out


def steering_pairs(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """n (positive, negative) prompt pairs that differ only in their sentiment words."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        state = rng.getstate()
        cast = rng.sample(PEOPLE, 2)
        pos = " ".join(mood_sentence(rng, p, True) for p in cast)
        rng.setstate(state)
        cast = rng.sample(PEOPLE, 2)
        neg = " ".join(mood_sentence(rng, p, False) for p in cast)
        pairs.append((pos, neg))
    return pairs


@dataclass(frozen=True)
class Person:
    """One person of the fixed built-in world."""

    name: str
    place: str
    thing: str
    feeling: str
    loves: str


def random_people(rng: random.Random, names: list[str]) -> list[Person]:
    """A person for each name, with a place, a distinct thing, a feeling and a loved place."""
    things = rng.sample([f"{c} {o}" for c in COLORS for o in OBJECTS], len(names))
    return [
        Person(
            name,
            rng.choice(PLACES),
            thing,
            rng.choice([w for p in FEELINGS for w in p]),
            rng.choice(PLACES),
        )  # fmt: skip
        for name, thing in zip(names, things, strict=True)
    ]


def fixed_world(seed: int = 0) -> list[Person]:
    """The fixed world behind the built-in documents: every person, where they are, what they have."""
    return random_people(random.Random(seed), PEOPLE)


def person_document(p: Person) -> str:
    """A person's document: where they are, what they have, how they feel, what they love."""
    return (
        f"{p.name} is in the {p.place}. {p.name} has the {p.thing}. "
        f"{p.name} feels {p.feeling}. {p.name} loves the {p.loves}."
    )


def place_document(rng: random.Random, place: str, people: list[Person]) -> str:
    """A place's document: a description, then who of `people` is there."""
    text = f"The {place} is {_pick(rng, DESCRIPTIONS, rng.random() < 0.5)}."
    return text + "".join(f" {p.name} is in the {place}." for p in people if p.place == place)


def world_documents(seed: int = 0) -> list[tuple[str, str]]:
    """(title, text) documents about the fixed world: one per person and one per place (28)."""
    world = fixed_world(seed)
    rng = random.Random(seed + 1)
    docs = [(p.name, person_document(p)) for p in world]
    docs += [(f"The {place}", place_document(rng, place, world)) for place in PLACES]
    return docs


def world_questions(seed: int = 0) -> list[tuple[str, str, str]]:
    """(question, answer key, document title) triples answerable from world_documents()."""
    out = []
    for p in fixed_world(seed):
        out.append((f"Where is {p.name}?", p.place, p.name))
        out.append((f"What does {p.name} have?", p.thing, p.name))
        out.append((f"Who has the {p.thing}?", p.name, p.name))
        out.append((f"How does {p.name} feel?", p.feeling, p.name))
    return out
