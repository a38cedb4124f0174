"""AdapterRouter on the real MiniLM embedder: accuracy on held-out prompts, threshold, top-k."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import yaml

from models.routing.config import AdapterConfig, RouterConfig
from models.routing.router import AdapterRouter

DATA = Path(__file__).parents[1] / "data"
TASK_PROMPTS = {
    "rewrite": "Please rewrite this so it sounds cheerful: the garden is grey and empty.",
    "qa": "Ivy has the lantern. Leo is at the beach. Question: who has the lantern?",
    "list": "List everyone mentioned here: Nora and Max walk to the market with Zoe.",
}
CHIT_CHAT = "hey there, how was your weekend?"


def load_adapters() -> list[AdapterConfig]:
    doc = yaml.safe_load((DATA / "router_adapters.yaml").read_text())
    return [AdapterConfig.model_validate(a) for a in doc["adapters"]]


def load_heldout() -> list[dict]:
    return [json.loads(line) for line in (DATA / "router_heldout.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def adapters() -> list[AdapterConfig]:
    return load_adapters()


@pytest.fixture(scope="module")
def router(adapters) -> AdapterRouter:
    return AdapterRouter(adapters, RouterConfig())


def hits(router: AdapterRouter, rows: list[dict]) -> list[bool]:
    decisions = router.route([r["prompt"] for r in rows])
    return [(d.adapter or "base") == r["label"] for d, r in zip(decisions, rows, strict=True)]


def accuracy(router: AdapterRouter, rows: list[dict]) -> float:
    right = hits(router, rows)
    return sum(right) / len(right)


def test_heldout_prompts_are_not_training_examples(adapters):
    rows = load_heldout()
    examples = {e for a in adapters for e in a.examples}
    assert len(rows) >= 200
    assert {r["label"] for r in rows} == {"rewrite", "qa", "list", "base"}
    assert not examples & {r["prompt"] for r in rows}


def test_auto_routes_heldout_set_accurately(router):
    rows = load_heldout()
    right = hits(router, rows)
    acc = sum(right) / len(right)
    print(f"held-out routing accuracy: {acc:.3f} on {len(rows)} prompts")
    assert acc >= 0.90
    for label in ("rewrite", "qa", "list", "base"):
        of_label = [h for h, r in zip(right, rows, strict=True) if r["label"] == label]
        assert sum(of_label) / len(of_label) >= 0.8, label


def test_routes_world_generator_prompts(router):
    world = pytest.importorskip("models.builtin.world")
    if not hasattr(world, "sample_task_prompt"):
        pytest.skip("models.builtin.world has no sample_task_prompt yet")
    rng = random.Random(0)
    rows = [
        {"prompt": world.sample_task_prompt(task, rng)[0], "label": task}
        for task in ("rewrite", "qa", "list")
        for _ in range(40)
    ]
    acc = accuracy(router, rows)
    print(f"toy-world task prompt routing accuracy: {acc:.3f} on {len(rows)} prompts")
    assert acc >= 0.85


def test_each_task_goes_to_its_adapter_and_chit_chat_to_base(router):
    decisions = router.route([*TASK_PROMPTS.values(), CHIT_CHAT])
    assert [d.adapter for d in decisions] == [*TASK_PROMPTS, None]
    for d in decisions[:3]:
        assert d.confidence >= router.config.threshold
        assert d.candidates[0] == (d.adapter, d.confidence)
        assert d.weights is None


def test_below_threshold_means_base(adapters):
    strict = AdapterRouter(adapters, RouterConfig(threshold=0.8))
    prompts = [r["prompt"] for r in load_heldout()[::5]]
    decisions = strict.route(prompts)
    assert any(d.adapter is None for d in decisions)
    assert any(d.adapter is not None for d in decisions)
    for d in decisions:
        if d.confidence < 0.8:
            assert d.adapter is None
        if d.adapter is not None:
            assert d.confidence >= 0.8


def test_threshold_only_mode_uses_threshold_alone(adapters):
    prompts = list(TASK_PROMPTS.values()) + [CHIT_CHAT]
    never = AdapterRouter(adapters, RouterConfig(base_class=False, threshold=1.0))
    always = AdapterRouter(adapters, RouterConfig(base_class=False, threshold=0.0))
    assert all(d.adapter is None for d in never.route(prompts))
    assert [d.adapter for d in always.route(prompts)[:3]] == list(TASK_PROMPTS)
    assert always.route([CHIT_CHAT])[0].adapter is not None  # nothing stops it without base


def test_top_k_weights_sum_to_one(adapters):
    router = AdapterRouter(adapters, RouterConfig(top_k=2, threshold=0.3))
    for d in router.route(list(TASK_PROMPTS.values())):
        assert d.adapter == d.candidates[0][0]
        assert len(d.candidates) == 2
        assert d.candidates[0][1] >= d.candidates[1][1]
        assert set(d.weights) == {name for name, _ in d.candidates}
        assert sum(d.weights.values()) == pytest.approx(1.0)
        assert d.weights[d.adapter] >= 0.5


def test_no_adapters_is_always_base_without_embedder():
    router = AdapterRouter([])
    assert router.embedder is None
    decisions = router.route(["Rewrite in a positive tone: the dog is sad.", "hi"])
    assert [d.adapter for d in decisions] == [None, None]
    assert router.route([]) == []


def test_one_adapter_with_base_class(adapters):
    rewrite = [a for a in adapters if a.name == "rewrite"]
    router = AdapterRouter(rewrite)
    decisions = router.route([TASK_PROMPTS["rewrite"], CHIT_CHAT])
    assert [d.adapter for d in decisions] == ["rewrite", None]


def test_one_adapter_without_base_class_uses_similarity(adapters):
    rewrite = [a for a in adapters if a.name == "rewrite"]
    router = AdapterRouter(rewrite, RouterConfig(base_class=False, threshold=0.5))
    on_task, off_task = router.route([TASK_PROMPTS["rewrite"], CHIT_CHAT])
    assert on_task.adapter == "rewrite"
    assert off_task.adapter is None
    assert on_task.confidence > off_task.confidence


def test_adapter_without_examples_is_known_but_never_routed(adapters):
    extra = AdapterConfig(name="legal", path="builtin:legal", description="no examples")
    router = AdapterRouter([*adapters, extra])
    assert {"name": "legal", "routable": False}.items() <= router.info()[-1].items()
    assert all(d.adapter != "legal" for d in router.route(list(TASK_PROMPTS.values())))


def test_duplicate_adapter_names_are_refused(adapters):
    with pytest.raises(ValueError, match="repeated: qa"):
        AdapterRouter([*adapters, adapters[1]])


def test_batched_and_single_routing_agree(router):
    prompts = list(TASK_PROMPTS.values()) + [CHIT_CHAT]
    batched = router.route(prompts)
    single = [router.route([p])[0] for p in prompts]
    for b, s in zip(batched, single, strict=True):
        assert b.adapter == s.adapter
        assert b.confidence == pytest.approx(s.confidence, abs=1e-3)
    assert json.dumps(batched[0].to_dict())


def test_long_prompts_are_routed_on_head_and_tail(router):
    people = [
        ("Nora", "library", "lantern"),
        ("Leo", "beach", "violin"),
        ("Ivy", "market", "scarf"),
    ]
    facts = " ".join(f"{n} is in the {p} with the {o}." for n, p, o in people * 16)
    assert router.embedder.count_word_pieces(facts) > 256  # beyond what MiniLM reads
    decisions = router.route(
        [
            f"List every person mentioned in this text: {facts}",
            f"{facts} List every person mentioned in that text.",
            f"{facts} Question: where is Leo?",
        ]
    )
    assert [d.adapter for d in decisions] == ["list", "list", "qa"]
