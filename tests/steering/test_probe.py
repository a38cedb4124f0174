"""The probe policy: a logistic regression on the big model's residual stream, captured in the
engine's step, decides when to steer (toy world: watch for gloom, turn on `positive`)."""

from __future__ import annotations

import random

import pytest
import torch

from models.builtin import quality, world
from models.engine.config import EngineConfig
from models.engine.llm_engine import LLMEngine
from models.protocol.requests import GenerationRequest, SamplingParams
from models.protocol.steering import SteeringRequest
from models.steering.config import SteeringConfig
from models.steering.policies.probe import train_probe
from models.steering.runtime import SteeringRuntime


def stories(seed: int, gloomy: bool, n: int) -> list[str]:
    rng = random.Random(seed)
    return [
        quality.chat_text("Continue the story: " + " ".join(
            world.story(rng, not gloomy, consistency=1.0, drift=False)))
        for _ in range(n)
    ]  # fmt: skip


PARAMS = {"vector": "positive", "coeff": 4.0, "hidden_layers": [1], "hidden_prompt_positions": 16,
          "window": 16, "positive": stories(11, True, 40), "negative": stories(12, False, 40)}  # fmt: skip


def test_logistic_regression_separates_a_linear_concept():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 8, generator=g) * 3 + 1
    y = (x[:, 2] - 0.5 * x[:, 5] > 1).float()
    probe = train_probe(x[:300], y[:300], l2=1e-3)
    held = probe.probability(x[300:])
    assert ((held > 0.5).float() == y[300:]).float().mean() >= 0.95
    assert held.min() >= 0 and held.max() <= 1


@pytest.fixture(scope="module")
def runtime(toy):
    config = SteeringConfig.model_validate(
        {"policies": [{"name": "probe", "kind": "probe", "params": PARAMS}]}
    )
    return SteeringRuntime.from_source(config, "builtin:toy")


def test_probe_fires_on_held_out_gloomy_stories_only(toy, runtime):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(toy.big)
    eng = LLMEngine(EngineConfig(num_kv_blocks=512, block_size=16, dtype="float32"), toy.big)
    eng.register_vector("positive", torch.zeros(eng.args.num_layers, eng.args.hidden_size))
    eng.set_step_observer(runtime)
    texts = {"g": stories(99, True, 8), "s": stories(98, False, 8)}
    reqs = [
        GenerationRequest(f"{mood}{i}", tok(text).input_ids, SamplingParams(max_tokens=2),
                          steering=SteeringRequest("probe", dict(PARAMS), mode="colocated"))
        for mood, group in texts.items() for i, text in enumerate(group)
    ]  # fmt: skip
    reqs.append(  # a request that drops the engine params: no hidden states reach the policy
        GenerationRequest("bare", tok(texts["g"][0]).input_ids, SamplingParams(max_tokens=2),
                          steering=SteeringRequest("probe", {}, mode="colocated"))
    )  # fmt: skip
    for r in reqs:
        eng.add_request(r)
    actions: dict[str, list] = {r.request_id: [] for r in reqs}
    errors = {}
    while eng.has_unfinished():
        for out in eng.step():
            actions[out.request_id] += out.interventions
            errors[out.request_id] = out.error
    fired = {rid for rid, ivs in actions.items() if any(i.action == "SteerVector" for i in ivs)}
    assert len([r for r in fired if r.startswith("g")]) >= 7, fired
    assert len([r for r in fired if r.startswith("s")]) <= 1, fired
    assert "reads the big model's hidden states at layers [1]" in errors["bare"]
    assert not [rid for rid, e in errors.items() if e and rid != "bare"]


def test_probe_config_errors_name_what_is_missing(toy):
    bad = dict(PARAMS, vector=None)
    config = SteeringConfig.model_validate(
        {"policies": [{"name": "p", "kind": "probe", "params": bad}]}
    )
    with pytest.raises(ValueError, match="action 'steer' needs params.vector"):
        SteeringRuntime.from_source(config, "builtin:toy")
