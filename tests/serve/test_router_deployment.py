"""The Router deployment in a real Ray Serve app: batched routing, info, the no-adapter path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.serve

DATA = Path(__file__).parents[1] / "data"


@pytest.fixture(scope="module")
def serve_session(serve_url):
    from ray import serve

    yield serve
    for app in ("router", "router_empty"):
        if app in serve.status().applications:
            serve.delete(app)


@pytest.fixture(scope="module")
def router_handle(serve_session):
    from deployments.router import Router

    doc = yaml.safe_load((DATA / "router_adapters.yaml").read_text())
    app = Router.options(ray_actor_options={"num_cpus": 0.5}).bind(
        adapters=doc["adapters"], router=doc["router"]
    )
    return serve_session.run(app, name="router", route_prefix=None)


def test_concurrent_prompts_are_batched_and_routed(router_handle):
    rows = [json.loads(line) for line in (DATA / "router_heldout.jsonl").read_text().splitlines()]
    rows = rows[::7][:32]
    responses = [router_handle.route.remote(r["prompt"]) for r in rows]
    decisions = [r.result(timeout_s=60) for r in responses]
    hits = sum((d["adapter"] or "base") == r["label"] for d, r in zip(decisions, rows, strict=True))
    assert hits / len(rows) >= 0.9
    for d in decisions:
        assert set(d) == {"adapter", "confidence", "candidates", "weights"}
    info = router_handle.info.remote().result()
    assert info["embedder_loaded"]
    assert [a["name"] for a in info["adapters"]] == ["rewrite", "qa", "list"]
    assert info["max_batch_size_seen"] > 1  # concurrent calls shared an embedding batch
    assert info["batches"] < len(rows)


def test_no_adapters_answers_base_without_embedder(serve_session):
    from deployments.router import Router

    handle = serve_session.run(
        Router.options(ray_actor_options={"num_cpus": 0.1}).bind(adapters=[], router={}),
        name="router_empty",
        route_prefix=None,
    )
    decision = handle.route.remote("Rewrite in a positive tone: the dog is sad.").result()
    assert decision["adapter"] is None
    info = handle.info.remote().result()
    assert info["adapters"] == [] and not info["embedder_loaded"]
