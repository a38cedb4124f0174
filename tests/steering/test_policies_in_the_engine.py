"""Steering through the torch engine on the built-in tiny models: the engine's tokens equal a
plain reference loop (big + small transformers models, greedy, the formula applied by hand);
failures leave the generation complete and flagged; resync after a lost state."""

from __future__ import annotations

import asyncio

import pytest
import torch

from models.builtin import resolve_source
from models.engine.config import EngineConfig
from models.engine.llm_engine import LLMEngine
from models.engine.torch_engine import TorchEngine
from models.protocol.requests import GenerationRequest, SamplingParams, SteerVectorSpec
from models.protocol.steering import SteeringRequest, StepObserver
from models.steering.config import SteeringConfig
from models.steering.runtime import SteeringRuntime
from models.steering.vectors import extract_vector, steered_transformers, transformers_hidden_states

HAPPY = ["I feel happy", "What a happy day", "She was happy and smiled", "happy happy"]
SAD = ["I feel sad", "What a sad day", "She was sad and cried", "sad sad"]
PROMPTS = [[5, 9, 12, 40, 41, 7], [7, 8, 9], [100, 200, 300, 400, 17, 3, 60, 61, 62]]
N = 8

CONFIG = {
    "expert_adapter": "positive",
    "policies": [
        {"name": "proxy", "kind": "proxy_tuning", "params": {"alpha": 1.5}},
        {"name": "contrast", "kind": "contrastive", "params": {"beta": 0.8,
                                                               "plausibility_alpha": 0.05}},
        {"name": "guard", "kind": "vector_guard",
         "params": {"vector": "happy", "coeff": 4.0, "threshold": 0.5,
                    "positive": HAPPY[2:3], "negative": SAD[2:3]}},
        {"name": "explode", "kind": "tests.steering.test_runtime:Exploding"},
    ],
}  # fmt: skip


@pytest.fixture(scope="module")
def tiny():
    return resolve_source("builtin:tiny")


@pytest.fixture(scope="module")
def runtime(tiny):
    return SteeringRuntime.from_source(SteeringConfig.model_validate(CONFIG), "builtin:tiny")


@pytest.fixture(scope="module")
def models(tiny):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def load(path):
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    expert = PeftModel.from_pretrained(load(tiny.small), tiny.small_adapters["positive"]).eval()
    return load(tiny.big), load(tiny.small), expert, AutoTokenizer.from_pretrained(tiny.big)


@pytest.fixture(scope="module")
def happy_vector(models):
    big, *_, tok = models
    read = transformers_hidden_states(big, tok)
    return extract_vector("happy", read, HAPPY, SAD, layers=[1, 2, 3])


def last_logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1].float()


def reference(models, prompt, adjust, n=N, skip=()) -> list[int]:
    """Greedy decoding written plainly: big-model logits, changed by `adjust(big_logits, ids)`
    except at the steps in `skip`."""
    big = models[0]
    ids = list(prompt)
    for step in range(n):
        logits = last_logits(big, ids)
        if step not in skip:
            logits = adjust(logits, ids)
        ids.append(int(logits.argmax()))
    return ids[len(prompt) :]


def proxy(models, alpha=1.5):
    _, small, expert, _ = models
    return lambda big, ids: big + alpha * (last_logits(expert, ids) - last_logits(small, ids))


def contrastive(models, beta=0.8, plausibility=0.05):
    small = models[1]

    def adjust(big, ids):
        probs = big.softmax(-1)
        out = big - beta * last_logits(small, ids)
        return out.masked_fill(probs < plausibility * probs.max(), float("-inf"))

    return adjust


def engine(tiny, runtime) -> LLMEngine:
    eng = LLMEngine(EngineConfig(num_kv_blocks=256, block_size=4), tiny.big)
    eng.set_step_observer(runtime)
    return eng


def run_all(eng: LLMEngine, requests: list[GenerationRequest]) -> dict:
    tokens: dict[str, list[int]] = {}
    outs: dict[str, list] = {}
    for request in requests:
        eng.add_request(request)
    while eng.has_unfinished():
        for out in eng.step():
            tokens.setdefault(out.request_id, []).extend(out.token_ids)
            outs.setdefault(out.request_id, []).append(out)
    return {rid: (tokens[rid], outs[rid]) for rid in tokens}


def request(rid, prompt, steering=None, **kw) -> GenerationRequest:
    params = SamplingParams(max_tokens=N, temperature=0, ignore_eos=True)
    steering = SteeringRequest(**steering) if steering else None
    return GenerationRequest(rid, prompt, params, steering=steering, **kw)


def interventions(outs) -> list:
    return [i for out in outs for i in out.interventions]


@pytest.mark.parametrize("mode", ["sync", "colocated"])
def test_proxy_tuning_and_contrastive_tokens_equal_the_reference_loop(tiny, runtime, models, mode):
    eng = engine(tiny, runtime)
    reqs = [request(f"p{i}", p, {"policy": "proxy", "mode": mode}) for i, p in enumerate(PROMPTS)]
    reqs += [
        request(f"c{i}", p, {"policy": "contrast", "mode": mode}) for i, p in enumerate(PROMPTS)
    ]
    reqs.append(request("plain", PROMPTS[0]))
    # rows of one policy with their own params share the policy's one batched delta
    own = {"alpha": 4.0}, {"beta": 2.0, "plausibility_alpha": 0.2}
    reqs.append(request("p-own", PROMPTS[1], {"policy": "proxy", "mode": mode, "params": own[0]}))
    reqs.append(request("c-own", PROMPTS[1], {"policy": "contrast", "mode": mode, "params": own[1]}))
    prefetched = runtime.stats().prefetched_rows
    got = run_all(eng, reqs)
    # after the first step every steered row's read started early (prefetch), same tokens
    assert runtime.stats().prefetched_rows - prefetched >= (N - 1) * 6
    plain = reference(models, PROMPTS[0], lambda big, ids: big)
    assert got["plain"][0] == plain
    for i, prompt in enumerate(PROMPTS):
        assert got[f"p{i}"][0] == reference(models, prompt, proxy(models))
        assert got[f"c{i}"][0] == reference(models, prompt, contrastive(models))
    assert got["p0"][0] != plain or got["c0"][0] != plain  # the steering did something
    assert got["p-own"][0] == reference(models, PROMPTS[1], proxy(models, alpha=4.0))
    assert got["c-own"][0] == reference(models, PROMPTS[1], contrastive(models, 2.0, 0.2))
    assert got["p-own"][0] != got["p1"][0] or got["c-own"][0] != got["c1"][0]
    assert eng.stats().observer_calls == N  # one call per step for all six steered rows
    runtime.release(list(got))


def test_async_never_waits_so_logit_adjustments_arrive_late(tiny, runtime, models):
    eng = engine(tiny, runtime)
    got = run_all(eng, [request("a", PROMPTS[1], {"policy": "proxy", "mode": "async"})])
    tokens, outs = got["a"]
    assert tokens == reference(models, PROMPTS[1], lambda big, ids: big)
    late = [i for i in interventions(outs) if i.detail.get("dropped") == "late"]
    assert late, "async adjustments for an already sampled token are reported as late"
    runtime.release(["a"])


def test_a_failing_steerer_leaves_the_generation_complete_and_flagged(tiny, runtime, models):
    eng = engine(tiny, runtime)
    got = run_all(eng, [request("x", PROMPTS[0], {"policy": "explode", "mode": "sync"})])
    tokens, outs = got["x"]
    assert tokens == reference(models, PROMPTS[0], lambda big, ids: big)
    assert outs[-1].finish_reason == "length"
    (flag,) = interventions(outs)
    assert flag.action == "steerer_error" and "policy blew up" in flag.detail["message"]

    # the small model itself failing: the same, for every row of that step
    small = runtime.small_model
    original = small.read
    small.read = lambda items, **kw: (_ for _ in ()).throw(RuntimeError("small model on fire"))
    try:
        got = run_all(
            engine(tiny, runtime), [request("y", PROMPTS[1], {"policy": "proxy", "mode": "sync"})]
        )
    finally:
        small.read = original
    tokens, outs = got["y"]
    assert len(tokens) == N and outs[-1].finish_reason == "length"
    assert any("small model on fire" in i.detail.get("message", "") for i in interventions(outs))
    runtime.release(["x", "y"])


class ForgetfulReplica(StepObserver):
    """The real runtime, except that at one step it forgets every request, as a Steerer
    replica that never saw them would."""

    def __init__(self, runtime: SteeringRuntime, forget_at_step: int):
        self.runtime = runtime
        self.forget_at_step = forget_at_step

    async def on_step(self, rows):
        if rows[0].events[-1].step == self.forget_at_step:
            self.runtime.release([r.request_id for r in rows])
        return await self.runtime.process(rows)


def test_resync_after_a_lost_state_rebuilds_it(tiny, runtime, models):
    eng = LLMEngine(EngineConfig(num_kv_blocks=256, block_size=4), tiny.big)
    eng.set_step_observer(ForgetfulReplica(runtime, forget_at_step=3))
    resyncs = runtime.stats().resyncs
    got = run_all(eng, [request("r", PROMPTS[2], {"policy": "proxy", "mode": "sync"})])
    assert runtime.stats().resyncs == resyncs + 1
    # step 3 went unadjusted (its answer was the resync request); from step 4 on, rebuilt
    assert got["r"][0] == reference(models, PROMPTS[2], proxy(models), skip={3})
    runtime.release(["r"])


def test_vector_steering_matches_the_transformers_reference(tiny, models, happy_vector):
    """A static vector through the engine = the same vector hooked into transformers: the
    engine and GGUF layer numbering agree (direction.l after block l)."""
    big, *_, tok = models
    eng = LLMEngine(EngineConfig(num_kv_blocks=256, block_size=4), tiny.big)
    eng.register_vector("happy", happy_vector.as_tensor(4))
    prompt = tok("The weather today is").input_ids
    spec = [SteerVectorSpec("happy", 4.0)]
    got = run_all(eng, [request("v", prompt, steer_vectors=spec), request("u", prompt)])
    with steered_transformers(big, happy_vector, 4.0):
        steered = reference(models, prompt, lambda b, ids: b)
    assert got["v"][0] == steered
    assert got["u"][0] == reference(models, prompt, lambda b, ids: b) != steered


def test_vector_guard_turns_the_vector_on_through_the_engine(tiny, runtime, models, happy_vector):
    big, *_, tok = models
    eng = engine(tiny, runtime)
    eng.register_vector("happy", happy_vector.as_tensor(4))
    happy_prompt = tok(HAPPY[2]).input_ids
    sad_prompt = tok(SAD[2]).input_ids
    got = run_all(
        eng,
        [
            request("h", happy_prompt, {"policy": "guard", "mode": "sync"}),
            request("s", sad_prompt, {"policy": "guard", "mode": "sync"}),
        ],
    )
    (on,) = interventions(got["h"][1])
    assert on.action == "SteerVector" and on.step == 0 and on.detail["name"] == "happy"
    assert interventions(got["s"][1]) == []
    # token 0 was sampled before the vector took effect; every later one is steered
    first = reference(models, happy_prompt, lambda b, ids: b, n=1)
    with steered_transformers(big, happy_vector, 4.0):
        rest = reference(models, happy_prompt + first, lambda b, ids: b, n=N - 1)
    assert got["h"][0] == first + rest
    runtime.release(["h", "s"])


def test_torch_engine_colocated_on_the_callers_event_loop(tiny, runtime, models):
    async def main():
        eng = TorchEngine(EngineConfig(num_kv_blocks=256, block_size=4), tiny.big)
        eng.set_step_observer(runtime)
        try:

            async def one(rid, prompt):
                toks = []
                async for out in eng.generate(
                    request(rid, prompt, {"policy": "proxy", "mode": "colocated"})
                ):
                    toks += out.token_ids
                return toks

            return await asyncio.gather(*(one(f"t{i}", p) for i, p in enumerate(PROMPTS)))
        finally:
            eng.shutdown()

    results = asyncio.run(main())
    for prompt, tokens in zip(PROMPTS, results, strict=True):
        assert tokens == reference(models, prompt, proxy(models))
    runtime.release([f"t{i}" for i in range(len(PROMPTS))])


def test_read_ahead_guesses_greedy_tokens_and_keeps_them_exact(tiny, models):
    """The small model reads the guessed next token early (on a side stream on CUDA; at once
    here); greedy guesses all hit, and the tokens stay those of the reference loop."""
    config = SteeringConfig.model_validate({**CONFIG, "read_ahead": True})
    rt = SteeringRuntime.from_source(config, "builtin:tiny")
    rt.small_model.reads_in_background = True  # CPU: the "background" read runs at once
    eng = engine(tiny, rt)
    reqs = [request(f"p{i}", p, {"policy": "proxy", "mode": "sync"}) for i, p in enumerate(PROMPTS)]
    reqs.append(request("c", PROMPTS[0], {"policy": "contrast", "mode": "sync"}))
    got = run_all(eng, reqs)
    for i, prompt in enumerate(PROMPTS):
        assert got[f"p{i}"][0] == reference(models, prompt, proxy(models))
    assert got["c"][0] == reference(models, PROMPTS[0], contrastive(models))
    stats = rt.stats()
    assert stats.read_ahead_hits == 4 * (N - 1) and stats.read_ahead_misses == 0

    # a sampled row: wrong guesses are re-read, and the answers stay those of the formula
    sampled = GenerationRequest(
        "s", PROMPTS[1], SamplingParams(max_tokens=N, temperature=5.0, seed=3, ignore_eos=True),
        steering=SteeringRequest("proxy", mode="sync"),
    )  # fmt: skip
    plain = SteeringRuntime.from_source(SteeringConfig.model_validate(CONFIG), "builtin:tiny")
    a = run_all(eng, [sampled])["s"][0]
    b = run_all(engine(tiny, plain), [sampled])["s"][0]
    assert a == b
    assert rt.stats().read_ahead_misses > 0
