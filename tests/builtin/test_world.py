"""The toy world's generator, grammar and checkers, and the short training schedule."""

from __future__ import annotations

import random
import re

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from models.builtin import resolve_source, world
from models.builtin.train import (
    SCHEDULES,
    ChatEncoder,
    Phase,
    base_example,
    new_model,
    train,
    train_all,
)
from models.builtin.validate import (
    answer_is_right,
    check_task,
    is_valid_sentence,
    is_valid_text,
    sentiment,
)


def test_generator_is_deterministic_and_grammatical():
    a = [world.story(random.Random(3), True) for _ in range(5)]
    b = [world.story(random.Random(3), True) for _ in range(5)]
    assert a == b
    rng = random.Random(0)
    sentences = [s for _ in range(500) for s in world.story(rng, rng.random() < 0.5)]
    assert all(is_valid_sentence(s) for s in sentences)
    assert not is_valid_sentence("Mia is in the moon.")
    assert not is_valid_sentence("Mia the park is.")
    assert not is_valid_text("Mia feels happy. Mia feels")


def test_sentiment_follows_the_story_mood():
    rng = random.Random(1)
    pos = [sentiment(" ".join(world.story(rng, True, 6))) for _ in range(200)]
    neg = [sentiment(" ".join(world.story(rng, False, 6))) for _ in range(200)]
    assert sum(s > 0 for s in pos) > 150 and sum(s < 0 for s in neg) > 150
    assert sentiment("Mia feels sad. The park is lovely. Leo hates the red cup.") == -1


def test_task_checkers_accept_references_and_reject_wrong_answers():
    rng = random.Random(2)
    for task in world.TASKS:
        for _ in range(100):
            prompt, answer = world.sample_task_prompt(task, rng)
            assert check_task(task, answer, answer), (task, prompt, answer)
    assert check_task("rewrite", "Mia feels happy.", "Mia feels glad.")
    assert not check_task("rewrite", "Mia feels happy.", "Mia feels sad.")
    assert not check_task("rewrite", "Mia feels happy.", "Leo feels happy.")
    assert check_task("qa", "In the park.", "in the park")
    assert not check_task("qa", "In the park.", "Mia is in the park.")
    assert check_task("list", "People: Mia, Leo.", "People: Leo, Mia")
    assert not check_task("list", "People: Mia, Leo.", "People: Mia.")
    assert check_task("qa", "Feels sad.", "Feels sad.")
    assert answer_is_right("red kite", "Mia has the red kite. Leo is sad.")
    assert not answer_is_right("red kite", "Mia has the blue kite. Leo has the red kite.")


def test_task_prompts_use_several_phrasings():
    rng = random.Random(4)
    for task, phrasings in [
        ("rewrite", world.REWRITE_PHRASINGS),
        ("list", world.LIST_PHRASINGS["people"] + world.LIST_PHRASINGS["objects"]),
    ]:
        prompts = [world.sample_task_prompt(task, rng)[0] for _ in range(200)]
        used = {p for p in phrasings if any(x.startswith(p.split("{")[0]) for x in prompts)}
        assert len(used) >= 4, task


def _rival_facts(prompt: str) -> list[str]:
    """Fact sentences of the prompt's passage that state another person's fact of the kind
    that its person-keyed question asks (read from the text, not from the generator)."""
    asked = re.search(r"(where is|what does|how does) (\w+)", prompt, re.IGNORECASE)
    if asked is None:  # "Who has the <thing>?": keyed by a distinct thing
        return []
    verb = {"where is": "is in the", "what does": "has the", "how does": "feels"}
    pattern = rf"\b(\w+) {verb[asked.group(1).lower()]} \w+"
    return [f for f in re.findall(pattern, prompt) if f != asked.group(2)]


def test_qa_questions_have_no_rival_fact_of_their_kind():
    rng = random.Random(8)
    prompts = [world.sample_task_prompt("qa", rng)[0] for _ in range(400)]
    assert [p for p in prompts if _rival_facts(p)] == []
    kinds = [re.search(r"(where is|what does|how does|who has)", p, re.IGNORECASE) for p in prompts]
    assert len({k.group(1).lower() for k in kinds}) == 4
    # The check sees rivals where there are some: the draw the benchmark reports apart.
    assert all(_rival_facts(world.qa_prompt(rng, rival=True)[0]) for _ in range(100))


def test_world_documents_answer_world_questions():
    docs = dict(world.world_documents())
    assert len(docs) >= 20
    questions = world.world_questions()
    assert len(questions) >= 40
    for question, key, title in questions:
        assert key in docs[title], (question, key, title)
    assert world.world_documents() == world.world_documents()


def test_steering_pairs_differ_only_in_sentiment_words():
    for pos, neg in world.steering_pairs(50):
        assert sentiment(pos) > 0 > sentiment(neg)
        diff = [(a, b) for a, b in zip(pos.split(), neg.split(), strict=True) if a != b]
        assert diff and all(world.TO_POSITIVE[b.rstrip(".")] == a.rstrip(".") for a, b in diff)


def test_chat_encoding_matches_the_chat_template():
    enc = ChatEncoder()
    messages = [{"role": "system", "content": "Use the text."}, {"role": "user", "content": "hi"}]
    ids, mask = enc.chat(messages, "Mia feels happy.")
    templated = enc.tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    assert ids[: len(templated)] == templated
    assert (
        enc.tok.decode([t for t, m in zip(ids, mask, strict=True) if m])
        == "Mia feels happy.<|im_end|>"
    )


def test_short_schedule_trains_every_model(tmp_path):
    log = train_all(tmp_path / "toy", "short", device="cpu")
    assert log["big"]["final_loss"] < log["big"]["first_loss"]
    paths = resolve_source(str(tmp_path / "toy"))
    assert set(paths.adapters) == set(world.TASKS) and set(paths.small_adapters) == {"positive"}
    tok = AutoTokenizer.from_pretrained(paths.big)
    for path in (paths.big, paths.small):
        model = AutoModelForCausalLM.from_pretrained(path)
        assert model.config.model_type == "qwen3" and model.config.vocab_size == len(tok)
    assert not (tmp_path / "toy.tmp").exists()


def test_a_time_boxed_phase_ends_on_time():
    model = new_model(SCHEDULES["short"].small, ChatEncoder(), seed=0)
    phase = Phase(steps=10**6, batch=4, lr=1e-3, seconds=1.0)
    log = train(model, base_example, phase, seed=0, device=torch.device("cpu"))
    assert 0 < log["steps"] < 10**6 and log["seconds"] < 3


def test_document_questions_are_answered_by_a_source_sentence():
    rng = random.Random(6)
    for _ in range(200):
        messages, answer, q = world.document_question(rng)
        text = "\n".join(m["content"] for m in messages)
        assert answer in text and answer_is_right(q.key, answer) and q.text in text


@pytest.mark.parametrize("task", ["nope"])
def test_unknown_task_is_an_error(task):
    with pytest.raises(ValueError, match="tasks: rewrite, qa, list"):
        world.sample_task_prompt(task, random.Random(0))
