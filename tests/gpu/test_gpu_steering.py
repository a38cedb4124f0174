"""Steering on a CUDA GPU: the paged small model (engine runner, CUDA graphs) gives the same
actions as the transformers one, and colocated proxy tuning runs through the engine."""

from __future__ import annotations

import pytest
import torch

from models.builtin import resolve_source
from models.engine.config import EngineConfig
from models.engine.llm_engine import LLMEngine
from models.protocol.requests import GenerationRequest, SamplingParams
from models.protocol.steering import ForwardPass, Prefilled, RowEvents, Sampled, SteeringRequest
from models.steering.config import SteeringConfig
from models.steering.runtime import SteeringRuntime

pytestmark = pytest.mark.gpu

POLICIES = [
    {"name": "proxy", "kind": "proxy_tuning", "params": {"alpha": 1.0}},
    {"name": "contrast", "kind": "contrastive", "params": {"beta": 0.5}},
]
PROMPTS = {"a": [5, 9, 12, 40, 41, 7], "b": [7, 8, 9], "c": list(range(20, 60))}


def runtime(runner: str) -> SteeringRuntime:
    config = SteeringConfig.model_validate(
        {"expert_adapter": "positive", "policies": POLICIES, "device": "cuda",
         "dtype": "float32", "small_model_runner": runner}
    )  # fmt: skip
    return SteeringRuntime.from_source(config, "builtin:tiny")


def test_paged_small_model_matches_transformers_on_cuda():
    paged, plain = runtime("engine"), runtime("transformers")
    assert paged.small_model.runner.graphs is not None, "decode steps should replay graphs"
    rows = [RowEvents(k, [Prefilled(p), ForwardPass(0)], "proxy" if k != "b" else "contrast")
            for k, p in PROMPTS.items()]  # fmt: skip
    for step in range(5):
        got, want = paged.process_now(rows), plain.process_now(rows)
        for g, w in zip(got, want, strict=True):
            assert g.error is None and w.error is None, (g.error, w.error)
            torch.testing.assert_close(g.actions[0].delta, w.actions[0].delta, atol=2e-3, rtol=2e-3)
        rows = [RowEvents(r.request_id, [Sampled(step, 11 + step), ForwardPass(step + 1)], r.policy)
                for r in rows]  # fmt: skip


def generate(rt: SteeringRuntime) -> tuple[dict, dict]:
    tiny = resolve_source("builtin:tiny")
    eng = LLMEngine(EngineConfig(device="cuda", dtype="float32", num_kv_blocks=256), tiny.big)
    eng.set_step_observer(rt)
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    for k, p in PROMPTS.items():
        steering = SteeringRequest("proxy", mode="colocated")
        eng.add_request(GenerationRequest(k, p, params, steering=steering))
    tokens: dict[str, list[int]] = {k: [] for k in PROMPTS}
    adjusted: dict[str, int] = {k: 0 for k in PROMPTS}
    while eng.has_unfinished():
        for out in eng.step():
            tokens[out.request_id] += out.token_ids
            adjusted[out.request_id] += sum(i.action == "AdjustedLogits" and "dropped" not in i.detail
                                            for i in out.interventions)  # fmt: skip
    rt.release(list(PROMPTS))
    return tokens, adjusted


@pytest.mark.timeout(120)  # read-ahead once stalled the GPU when policies were switched
def test_colocated_proxy_tuning_through_the_cuda_engine_with_read_ahead():
    rt = runtime("engine")
    rt.config.read_ahead = True
    assert rt.small_model.reads_in_background
    tokens, adjusted = generate(rt)
    assert all(len(t) == 12 for t in tokens.values())
    assert all(n == 12 for n in adjusted.values()), adjusted
    assert rt.stats().read_ahead_hits == 3 * 11 and rt.stats().read_ahead_misses == 0
    rt.config.read_ahead = False
    assert generate(rt)[0] == tokens  # the side stream changes nothing but the timing
