"""Writes tests/data/router_heldout.jsonl: labelled prompts the router never trains on.

Task prompts come from templates and vocabulary that differ from the examples in
router_adapters.yaml (other phrasings, other names, objects and places, mixed in with the toy
world's); base prompts are written by hand and differ from models/routing/base_prompts.py.
Run: python tests/data/make_router_heldout.py (seeded, so the file is reproducible).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

PER_TASK = 55
PEOPLE = ["Mia", "Tom", "Nora", "Leo", "Ivy", "Max", "Zoe", "Omar", "Ben", "Grace", "Hugo", "Rosa"]
OBJECTS = [
    "red ball",
    "umbrella",
    "lantern",
    "violin",
    "basket",
    "blue cup",
    "map",
    "bicycle",
    "old book",
    "candle",
    "scarf",
    "toy boat",
    "letter",
    "key",
]
PLACES = [
    "bakery",
    "beach",
    "library",
    "attic",
    "garden",
    "lake",
    "station",
    "forest",
    "kitchen",
    "market",
    "school",
    "harbour",
]
ANIMALS = ["old dog", "grey cat", "little bird", "tired horse", "small rabbit"]
SAD = ["sad", "lonely", "tired", "upset", "worried", "gloomy", "cold and hungry"]
BROKEN = ["broken", "lost", "torn", "wet", "dirty", "empty", "cracked"]

REWRITE_TEMPLATES = [
    "Could you rephrase this so it sounds hopeful? {s}",
    "Put a positive spin on the following: {s}",
    "Reword this sentence to be more encouraging: {s}",
    "{s} Rewrite that so it sounds happy.",
    "Transform the sentence below into a positive one.\n{s}",
    "Please make the tone of this line upbeat: {s}",
    "Rewrite the next sentence, keeping its meaning but making it cheerful: {s}",
    "I need a more optimistic version of this: {s}",
    "Change the mood of this sentence to joyful: {s}",
    "Soften this and make it sound positive: {s}",
    "Rewrite cheerfully: {s}",
    "Express this in a more positive way: {s}",
]
QA_TEMPLATES = [
    "Here is a short text: {p} Now tell me, {q}",
    "{p}\nQ: {Q}\nA:",
    "From the passage below, {q}\n{p}",
    "Read carefully. {p} {Q}",
    "{p} Based only on these sentences, {q}",
    "Look at this story and answer the question. Story: {p} Question: {Q}",
    "{Q} Use this text to answer: {p}",
    "Given: {p} Answer this: {Q}",
    "In the following paragraph, {q} Paragraph: {p}",
    "{p} Can you answer this from the text? {Q}",
]
LIST_TEMPLATES = [
    "Who is mentioned in the following text? {p}",
    "Please list every name that appears here: {p}",
    "Extract all the objects from this passage: {p}",
    "{p} List the people in that passage.",
    "Give a bullet list of the items mentioned: {p}",
    "Identify each person in the text below.\n{p}",
    "Find all the things named in: {p}",
    "Which characters appear in this passage? List them. {p}",
    "Enumerate the objects: {p}",
    "Write a list of everyone who shows up in this story: {p}",
    "What are the names of all the people in this text? {p}",
    "List the things that are mentioned in these sentences: {p}",
]
BASE_PROMPTS = [
    "hey, how's it going?",
    "Good evening! Did you have a nice day?",
    "Thanks, that answer was really useful.",
    "What can you help me with?",
    "Are you a robot?",
    "Tell me something funny.",
    "See you tomorrow, goodbye!",
    "What's the capital of Australia?",
    "Who painted the Mona Lisa?",
    "How many planets are there in the solar system?",
    "What is the boiling point of water in Fahrenheit?",
    "Why do leaves change colour in autumn?",
    "How do airplanes stay in the air?",
    "What year did the Second World War end?",
    "What is the largest ocean on Earth?",
    "Explain how vaccines work.",
    "What's the difference between a virus and a bacterium?",
    "Who invented the telephone?",
    "How does the stock market work?",
    "What is 17 times 23?",
    "Convert 5 kilometres to miles.",
    "What is the derivative of x squared?",
    "Is 97 a prime number?",
    "Write a JavaScript function that reverses a string.",
    "How do I create a virtual environment in Python?",
    "What is the difference between a list and a tuple in Python?",
    "Fix this SQL query: SELECT * FORM users;",
    "What does a load balancer do?",
    "Write a haiku about snow falling on the city.",
    "Compose a limerick about a forgetful wizard.",
    "Write a short science fiction story set on Mars.",
    "Give me five ideas for a weekend hobby.",
    "Come up with a slogan for a bicycle shop.",
    "How do you say 'good morning' in Spanish?",
    "Translate this into Italian: where is the train station?",
    "What's a good vegetarian dinner I can make in 20 minutes?",
    "How long should I boil an egg?",
    "How can I stop procrastinating?",
    "What are the benefits of regular exercise?",
    "Suggest a good science fiction novel for a teenager.",
    "What should I pack for a week of hiking?",
    "Help me write a cover letter for a nursing job.",
    "Draft a polite message declining a wedding invitation.",
    "What is the meaning of the word 'ephemeral'?",
    "Explain the rules of chess briefly.",
    "Who won the football World Cup in 2010?",
    "What is inflation and why does it happen?",
    "Describe how a rainbow forms.",
    "What are black holes made of?",
    "Can dogs eat chocolate?",
    "Give me a motivational quote.",
    "What time zone is Tokyo in?",
    "Recommend a podcast about economics.",
    "How do I change a flat tyre on my car?",
    "What is the population of Brazil roughly?",
]


def negative_sentence(rng: random.Random) -> str:
    """A short gloomy sentence about the toy world."""
    person, obj, place = rng.choice(PEOPLE), rng.choice(OBJECTS), rng.choice(PLACES)
    forms = [
        f"{person} is {rng.choice(SAD)} at the {place}.",
        f"the {obj} is {rng.choice(BROKEN)} and nobody at the {place} cares.",
        f"{person} lost the {obj} on the way to the {place}.",
        f"nobody came to {person}'s party at the {place}.",
        f"the {rng.choice(ANIMALS)} looks {rng.choice(SAD)} near the {place}.",
        f"it rained all day and {person} had to stay inside the {place}.",
    ]
    return rng.choice(forms)


def passage_and_question(rng: random.Random) -> tuple[str, str]:
    """Two or three facts and a question that one of them answers."""
    a, b, c = rng.sample(PEOPLE, 3)
    obj, obj2 = rng.sample(OBJECTS, 2)
    place, place2 = rng.sample(PLACES, 2)
    facts = [f"{a} has the {obj}.", f"{b} is at the {place}.", f"{c} gives the {obj2} to {a}."]
    if rng.random() < 0.5:
        facts.append(f"The {obj} is near the {place2}.")
    rng.shuffle(facts)
    question = rng.choice(
        [
            f"where is {b}?",
            f"who has the {obj}?",
            f"what does {c} give to {a}?",
            f"who is at the {place}?",
            f"what does {a} have?",
        ]
    )
    return " ".join(facts), question


def article(noun: str) -> str:
    """'a' or 'an' plus the noun."""
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def mention_passage(rng: random.Random) -> str:
    """A passage that mentions several people and objects."""
    a, b, c = rng.sample(PEOPLE, 3)
    o1, o2, o3 = rng.sample(OBJECTS, 3)
    place = rng.choice(PLACES)
    forms = [
        f"{a} and {b} carry {article(o1)} and {article(o2)} to the {place}, where {c} waits.",
        f"At the {place}, {a} finds {article(o1)}. {b} brings {article(o2)}, and {c} forgets "
        f"the {o3}.",
        f"{a} meets {b} near the {place}; they share {article(o1)} and {article(o2)}.",
        f"The {o1}, the {o2} and the {o3} lie on the table while {a} talks to {c}.",
    ]
    return rng.choice(forms)


def heldout_rows(seed: int = 7) -> list[dict[str, str]]:
    """Labelled rows: PER_TASK per task and every hand-written base prompt."""
    rng = random.Random(seed)
    rows = []
    for _ in range(PER_TASK):
        s = negative_sentence(rng)
        s = s[0].upper() + s[1:]
        rows.append({"prompt": rng.choice(REWRITE_TEMPLATES).format(s=s), "label": "rewrite"})
    for _ in range(PER_TASK):
        p, q = passage_and_question(rng)
        text = rng.choice(QA_TEMPLATES).format(p=p, q=q, Q=q[0].upper() + q[1:])
        rows.append({"prompt": text, "label": "qa"})
    for _ in range(PER_TASK):
        text = rng.choice(LIST_TEMPLATES).format(p=mention_passage(rng))
        rows.append({"prompt": text, "label": "list"})
    rows += [{"prompt": p, "label": "base"} for p in BASE_PROMPTS]
    return rows


if __name__ == "__main__":
    out = Path(__file__).with_name("router_heldout.jsonl")
    rows = heldout_rows()
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {len(rows)} rows to {out}")
