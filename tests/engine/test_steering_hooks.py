"""Steering hooks of the torch engine: the per-step observer call and every action."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from models.engine.config import EngineConfig
from models.engine.llm_engine import LLMEngine
from models.engine.tiny_checkpoint import build_tiny_checkpoint
from models.protocol.requests import GenerationRequest, SamplingParams, SteerVectorSpec
from models.protocol.steering import (
    AdjustedLogits,
    AdjustedPrefill,
    Backtrack,
    EmitError,
    ForceOutput,
    ForceTokens,
    ForwardPass,
    Prefilled,
    RowActions,
    Sampled,
    SteeringRequest,
    SteerVector,
    StepObserver,
)

PROMPT = [11, 22, 33, 44, 55]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build_tiny_checkpoint(tmp_path_factory.mktemp("steer"), "qwen3", seed=2)


@pytest.fixture(scope="module")
def hf(ckpt):
    return AutoModelForCausalLM.from_pretrained(str(ckpt)).eval()


class Policy(StepObserver):
    """A step observer whose answer per row comes from `decide(row, forward_step)`."""

    def __init__(self, decide=None, fail: Exception | None = None, delay: float = 0.0):
        self.decide = decide or (lambda row, step: [])
        self.fail = fail
        self.delay = delay
        self.calls: list[list] = []

    async def on_step(self, rows):
        self.calls.append(rows)
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.fail:
            raise self.fail
        out = []
        for row in rows:
            step = next(e.step for e in reversed(row.events) if isinstance(e, ForwardPass))
            out.append(RowActions(row.request_id, self.decide(row, step)))
        return out


def make_engine(ckpt, observer=None) -> LLMEngine:
    eng = LLMEngine(EngineConfig(num_kv_blocks=64, block_size=4), ckpt)
    if observer is not None:
        eng.set_step_observer(observer)
    return eng


def steered(rid: str, mode: str = "sync", max_tokens: int = 10, **steering) -> GenerationRequest:
    return GenerationRequest(
        rid,
        list(PROMPT),
        SamplingParams(max_tokens=max_tokens, temperature=0),
        steering=SteeringRequest(**{"policy": "test", "mode": mode, **steering}),
    )


def run(eng: LLMEngine, *requests: GenerationRequest) -> dict[str, list]:
    for r in requests:
        eng.add_request(r)
    outs: dict[str, list] = {}
    while eng.has_unfinished():
        for out in eng.step():
            outs.setdefault(out.request_id, []).append(out)
    return outs


def tokens(outs: list) -> list[int]:
    return [t for o in outs for t in o.token_ids]


def hf_greedy(hf, ids: list[int], n: int) -> list[int]:
    out = hf.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, len(ids) :].tolist()


def test_backtrack_and_force_tokens_rewind_the_kv_cache(ckpt, hf):
    base = hf_greedy(hf, PROMPT, 10)
    forced = [7, 8]

    done = []

    def decide(row, step):  # once: after the rewind, step 5 comes again
        if step == 5 and not done:
            done.append(step)
            return [Backtrack(3, token_ids=forced)]
        return []

    outs = run(make_engine(ckpt, Policy(decide)), steered("b", params={"max_backtrack": 4}))["b"]
    got = tokens(outs)
    prefix = base[:2] + forced
    assert got[:4] == prefix
    assert got[4:] == hf_greedy(hf, PROMPT + prefix, 6)  # KV equals a fresh run of these ids
    assert [i.action for o in outs for i in o.interventions] == ["Backtrack"]
    assert outs[-1].finish_reason == "length"


def test_force_tokens_then_continue(ckpt, hf):
    def decide(row, step):
        return [ForceTokens([3, 4, 5])] if step == 2 else []

    got = tokens(run(make_engine(ckpt, Policy(decide)), steered("f"))["f"])
    base = hf_greedy(hf, PROMPT, 2)
    assert got[:5] == base + [3, 4, 5]
    assert got[5:] == hf_greedy(hf, PROMPT + got[:5], 5)


def test_backtrack_past_streamed_text_is_an_error(ckpt):
    def decide(row, step):
        return [Backtrack(2)] if step == 4 else []

    outs = run(make_engine(ckpt, Policy(decide)), steered("e"))["e"]
    assert outs[-1].finish_reason == "error"
    assert "Backtrack(2)" in outs[-1].error and "max_backtrack=0" in outs[-1].error


def test_adjusted_logits_bans_a_token(ckpt, hf):
    banned = hf_greedy(hf, PROMPT, 1)[0]
    delta = torch.zeros(512)
    delta[banned] = -1e9

    got = tokens(
        run(make_engine(ckpt, Policy(lambda r, s: [AdjustedLogits(s, delta=delta)])), steered("a"))[
            "a"
        ]
    )
    assert banned not in got and len(got) == 10


def test_plausibility_head_keeps_only_plausible_tokens(ckpt, hf):
    # replace the logits with a flat preference for token 0, but alpha=1 keeps only the argmax
    flat = torch.zeros(512)
    flat[0] = 50.0

    def decide(row, step):
        return [AdjustedLogits(step, logits=flat, plausibility_alpha=1.0)]

    got = tokens(run(make_engine(ckpt, Policy(decide)), steered("p"))["p"])
    assert got == hf_greedy(hf, PROMPT, 10)


def test_steering_vector_changes_only_its_row(ckpt, hf):
    eng = make_engine(ckpt)
    torch.manual_seed(0)
    eng.register_vector("v", torch.randn(2, 64) * 4)
    plain = GenerationRequest("plain", list(PROMPT), SamplingParams(max_tokens=10, temperature=0))
    pushed = GenerationRequest(
        "pushed",
        list(PROMPT),
        SamplingParams(max_tokens=10, temperature=0),
        steer_vectors=[SteerVectorSpec("v", 2.0)],
    )
    outs = run(eng, plain, pushed)
    base = hf_greedy(hf, PROMPT, 10)
    assert tokens(outs["plain"]) == base
    assert tokens(outs["pushed"]) != base


def test_steer_vector_action_applies_from_the_next_step(ckpt, hf):
    eng = make_engine(ckpt, Policy(lambda r, s: [SteerVector("v", 3.0)] if s == 3 else []))
    torch.manual_seed(0)
    eng.register_vector("v", torch.randn(2, 64) * 4)
    other = GenerationRequest("other", list(PROMPT), SamplingParams(max_tokens=10, temperature=0))
    outs = run(eng, steered("s"), other)
    base = hf_greedy(hf, PROMPT, 10)
    assert tokens(outs["other"]) == base
    assert tokens(outs["s"])[:3] == base[:3] and tokens(outs["s"]) != base


def test_illegal_action_errors_naming_event_and_action(ckpt):
    policy = Policy(lambda r, s: [AdjustedPrefill([1, 2])] if s == 3 else [])
    outs = run(make_engine(ckpt, policy), steered("i"))["i"]
    assert outs[-1].finish_reason == "error"
    assert "AdjustedPrefill" in outs[-1].error and "ForwardPass" in outs[-1].error


def test_adjusted_prefill_replaces_the_prompt(ckpt, hf):
    new_prompt = [9, 8, 7]
    policy = Policy(lambda r, s: [AdjustedPrefill(new_prompt)] if r.token_ids == PROMPT else [])
    outs = run(make_engine(ckpt, policy), steered("ap"))["ap"]
    assert tokens(outs) == hf_greedy(hf, new_prompt, 10)
    assert outs[-1].num_prompt_tokens == 3


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_failing_observer_leaves_the_row_complete_and_flagged(ckpt, hf, mode):
    eng = make_engine(ckpt, Policy(fail=RuntimeError("boom")))
    eng.add_request(steered("x", mode))
    first = eng.step()
    time.sleep(0.05)  # an async call's failure lands on the observer loop meanwhile
    outs = first + run(eng)["x"]
    assert tokens(outs) == hf_greedy(hf, PROMPT, 10)
    assert outs[-1].finish_reason == "length"
    flagged = [i for o in outs for i in o.interventions]
    assert [i.action for i in flagged] == ["steerer_error"]
    assert "boom" in flagged[0].detail["message"]


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_slow_observer_times_out(ckpt, hf, mode):
    eng = make_engine(ckpt, Policy(delay=2.0))
    eng.add_request(steered("t", mode, max_tokens=20, timeout_s=0.05))
    first = eng.step()  # async: the call is in flight; sync: it timed out inside the step
    time.sleep(0.1)  # past the deadline, so the next step gives up on it
    outs = first + run(eng)["t"]
    assert outs[-1].finish_reason == "length" and len(tokens(outs)) == 20
    assert [i.action for o in outs for i in o.interventions] == ["steerer_timeout"]


def test_one_observer_call_per_step_for_all_steered_rows(ckpt):
    policy = Policy()
    eng = make_engine(ckpt, policy)
    plain = GenerationRequest("plain", [1, 2, 3], SamplingParams(max_tokens=8, temperature=0))
    run(eng, *(steered(f"r{i}", max_tokens=8) for i in range(3)), plain)
    assert len(policy.calls) == 8 == eng.stats().observer_calls
    assert all(sorted(r.request_id for r in call) == ["r0", "r1", "r2"] for call in policy.calls)
    first = policy.calls[0][0]
    assert isinstance(first.events[0], Prefilled) and first.token_ids == PROMPT
    assert first.events[-1].logits is not None and first.events[-1].logits.shape == (512,)
    later = policy.calls[1][0]
    assert isinstance(later.events[0], Sampled) and later.token_ids is None


def test_every_k_consults_every_k_tokens(ckpt):
    policy = Policy()
    run(make_engine(ckpt, policy), steered("k", max_tokens=9, every=3))
    assert [c[0].events[-1].step for c in policy.calls] == [0, 3, 6]
    assert sum(isinstance(e, Sampled) for e in policy.calls[1][0].events) == 3


def test_async_adjusted_logits_for_a_sampled_step_is_late(ckpt):
    class SyncPolicy(StepObserver):  # answers at once, but async rows still never wait for it
        def on_step(self, rows):
            return [RowActions(r.request_id, [AdjustedLogits(r.events[-1].step)]) for r in rows]

    outs = run(make_engine(ckpt, SyncPolicy()), steered("late", "async", max_tokens=4))["late"]
    details = [i.detail for o in outs for i in o.interventions]
    assert details and all(d.get("dropped") == "late" for d in details)


def test_force_output_and_emit_error_finish_the_row(ckpt):
    policy = Policy(lambda r, s: [ForceOutput("done.")] if s == 2 else [])
    outs = run(make_engine(ckpt, policy), steered("fo"))["fo"]
    assert outs[-1].finish_reason == "stop" and len(tokens(outs)) == 2
    assert "".join(o.text for o in outs) == "done."
    policy = Policy(lambda r, s: [EmitError("policy says no")] if s == 1 else [])
    outs = run(make_engine(ckpt, policy), steered("ee"))["ee"]
    assert outs[-1].finish_reason == "error" and outs[-1].error == "policy says no"


def test_held_back_text_hides_a_backtrack_from_the_stream():
    builtin = pytest.importorskip("models.builtin")
    path = builtin.resolve_source("builtin:tiny").big
    done = []

    def decide(row, step):
        if step == 6 and not done:
            done.append(step)
            return [Backtrack(3, token_ids=[row.num_prompt_tokens + 10])]
        return []

    policy = Policy(decide)
    eng = LLMEngine(EngineConfig(num_kv_blocks=64), path)
    eng.set_step_observer(policy)
    prompt = eng.tokenizer.encode("once upon a time")
    req = GenerationRequest(
        "h",
        prompt,
        SamplingParams(max_tokens=16, temperature=0),
        steering=SteeringRequest("test", {"max_backtrack": 4}, mode="sync"),
    )
    outs = run(eng, req)["h"]
    final_ids = tokens(outs)
    assert "".join(o.text for o in outs) == eng.tokenizer.decode(
        final_ids, skip_special_tokens=True
    )
    assert [i.action for o in outs for i in o.interventions] == ["Backtrack"]


def test_bad_forced_tokens_fail_only_their_row(ckpt, hf):
    policy = Policy(lambda r, s: [ForceTokens([10**6])] if r.request_id == "bad" and s == 1 else [])
    eng = make_engine(ckpt, policy)
    outs = run(eng, steered("bad"), steered("good"))
    assert outs["bad"][-1].finish_reason == "error" and "ForceTokens" in outs["bad"][-1].error
    assert tokens(outs["good"]) == hf_greedy(hf, PROMPT, 10)


def test_unknown_vector_or_layer_is_refused_at_add(ckpt):
    from models.protocol.errors import EngineError

    eng = make_engine(ckpt)
    eng.register_vector("v", torch.ones(2, 64))
    params = SamplingParams(max_tokens=4, temperature=0)
    with pytest.raises(EngineError, match="'w' is not registered; registered: v"):
        eng.add_request(
            GenerationRequest("a", PROMPT, params, steer_vectors=[SteerVectorSpec("w", 1.0)])
        )
    with pytest.raises(EngineError, match=r"layers \[5\] outside \[0, 2\)"):
        eng.add_request(
            GenerationRequest("b", PROMPT, params, steer_vectors=[SteerVectorSpec("v", 1.0, [5])])
        )
    with pytest.raises(EngineError, match=r"\[num_layers, hidden\] = \[2, 64\]"):
        eng.register_vector("bad", torch.ones(3, 64))


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_torch_engine_runs_observer_coroutines_on_the_callers_loop(ckpt, hf, mode):
    from models.engine import build_engine

    loops = set()

    def decide(row, step):
        loops.add(id(asyncio.get_running_loop()))
        return [ForceTokens([3, 4])] if step == 2 else []

    async def main():
        eng = build_engine(EngineConfig(num_kv_blocks=64, block_size=4), str(ckpt))
        await eng.start()
        eng.set_step_observer(Policy(decide))
        runs = [eng.generate(steered(f"r{i}", mode, max_tokens=8)) for i in range(3)]
        outs = await asyncio.gather(*[_collect(r) for r in runs])
        stats = eng.stats()
        eng.shutdown()
        return outs, stats, id(asyncio.get_running_loop())

    outs, stats, main_loop = asyncio.run(main())
    assert loops == {main_loop}
    for out in outs:
        assert out[-1].finish_reason == "length" and len(tokens(out)) == 8
        actions = [i.action for o in out for i in o.interventions]
        if mode == "sync":
            assert tokens(out)[:4] == hf_greedy(hf, PROMPT, 2) + [3, 4]
            assert actions == ["ForceTokens"]
        else:  # async skips a consult while its last call is in flight: step 2 may be skipped
            assert actions in ([], ["ForceTokens"])
    assert 0 < stats.observer_calls <= stats.steps


async def _collect(stream) -> list:
    return [o async for o in stream]


def test_unchanged_row_deltas_reuse_one_stacked_tensor(ckpt):
    """The stacked steering deltas are rebuilt only when a row's vectors or the rows change."""
    eng = LLMEngine(EngineConfig(num_kv_blocks=64, block_size=4), ckpt)
    layers, hidden = eng.args.num_layers, eng.args.hidden_size
    eng.register_vector("v", torch.ones(layers, hidden))
    params = SamplingParams(max_tokens=4, temperature=0)
    steer = [SteerVectorSpec("v", 2.0, [0])]
    for rid, vectors in (("a", steer), ("b", []), ("c", steer)):
        eng.add_request(GenerationRequest(rid, [1, 2, 3], params, steer_vectors=vectors))
    a, b, c = (eng.seqs[r] for r in "abc")
    first = eng._steer_deltas([a, b, c])
    assert first.shape == (layers, 3, hidden)
    assert first[0, 0].eq(2).all() and first[0, 1].eq(0).all() and first[1].eq(0).all()
    assert eng._steer_deltas([a, b, c]) is first
    assert eng._steer_deltas([a, c]) is not first  # other rows
    eng.set_vector(b, "v", -1.0, None)  # a row's vectors change
    again = eng._steer_deltas([a, b, c])
    assert again is not first and again[:, 1].eq(-1).all()
    assert eng._steer_deltas([b]) is not again
    assert eng._steer_deltas([eng.seqs["b"]])[:, 0].eq(-1).all()


def test_anything_raised_while_stepping_one_row_fails_that_row_alone(ckpt, hf, monkeypatch):
    """Rows whose steering answer breaks in the engine (a delta the sampler cannot use, a
    coefficient past the cap, tokens that are not ints) or whose sampling raises end with
    finish_reason "error"; the other rows of the same batch are untouched, and the engine goes
    on serving."""
    vocab = 512

    def decide(row, step):
        if step != 2:
            return []
        return {
            "bad-delta": [AdjustedLogits(step, delta=torch.empty(vocab, device="meta"))],
            "bad-shape": [AdjustedLogits(step, delta=torch.zeros(3))],
            "bad-coeff": [SteerVector("v", 1e30)],
            "bad-tokens": [ForceTokens(["x"])],
        }.get(row.request_id, [])

    eng = make_engine(ckpt, Policy(decide))
    eng.register_vector("v", torch.ones(2, 64))
    bad = ["bad-delta", "bad-shape", "bad-coeff", "bad-tokens"]
    outs = run(eng, *(steered(rid) for rid in ["good-1", *bad, "good-2"]))
    for rid in bad:
        assert outs[rid][-1].finish_reason == "error" and outs[rid][-1].error, rid
        assert len(tokens(outs[rid])) <= 3
    assert "1e+30" in outs["bad-coeff"][-1].error and "(3,)" in outs["bad-shape"][-1].error
    assert "sampling" in outs["bad-delta"][-1].error
    expected = hf_greedy(hf, PROMPT, 10)
    assert tokens(outs["good-1"]) == tokens(outs["good-2"]) == expected
    assert eng.stats().failed_rows >= 1

    import models.engine.llm_engine as core  # sampling that raises on one row's params

    original = core.sample

    def picky(logits, seqs, *args, **kwargs):
        if any(s.request_id == "cursed" for s in seqs):
            raise OverflowError("Overflow when unpacking long long")
        return original(logits, seqs, *args, **kwargs)

    monkeypatch.setattr(core, "sample", picky)
    plain = [GenerationRequest(rid, list(PROMPT), SamplingParams(max_tokens=6, temperature=0))
             for rid in ("a", "cursed", "b")]  # fmt: skip
    outs = run(eng, *plain)
    assert outs["cursed"][-1].finish_reason == "error" and "Overflow" in outs["cursed"][-1].error
    assert tokens(outs["a"]) == tokens(outs["b"]) == expected[:6]
    monkeypatch.setattr(core, "sample", original)
    assert tokens(run(eng, steered("after", max_tokens=4))["after"]) == expected[:4]


def test_rows_that_do_not_wait_never_wait_for_a_slow_steerer(ckpt, hf):
    """A sync row whose Steerer holds its answer (a gate the test opens) sits out, parked,
    while a plain row and an async row of the same batch run to their end; once the answers
    come, the sync row gets each one before each of its tokens, and its text is whole."""
    import threading

    gate = threading.Event()

    class Gated(Policy):
        async def on_step(self, rows):
            self.calls.append(rows)
            await asyncio.to_thread(gate.wait, 60)
            return [RowActions(r.request_id) for r in rows]

    policy = Gated()
    eng = make_engine(ckpt, policy)
    plain = GenerationRequest("plain", list(PROMPT), SamplingParams(max_tokens=10, temperature=0))
    for r in (steered("sync", "sync", max_tokens=3, timeout_s=60), plain, steered("async", "async")):
        eng.add_request(r)
    outs: dict[str, list] = {}
    deadline = time.monotonic() + 30
    while not all(outs.get(r) and outs[r][-1].finished for r in ("plain", "async")):
        assert time.monotonic() < deadline, "the plain and async rows waited for the Steerer"
        for out in eng.step():
            outs.setdefault(out.request_id, []).append(out)
    assert not tokens(outs.get("sync", []))  # its answer has not come: it has no token yet
    gate.set()
    for out in [o for _ in range(1000) if eng.has_unfinished() for o in eng.step()]:
        outs.setdefault(out.request_id, []).append(out)
    expected = hf_greedy(hf, PROMPT, 10)
    assert tokens(outs["sync"]) == expected[:3] and tokens(outs["plain"]) == expected
    assert tokens(outs["async"]) == expected
    assert [o.interventions for o in outs["sync"] if o.interventions] == []  # none timed out
    assert sum(1 for call in policy.calls for r in call if r.request_id == "sync") == 3


def test_a_dead_steerer_costs_the_step_its_timeout_only_and_the_row_goes_on(ckpt, hf):
    policy = Policy(delay=30.0)  # never answers in time
    eng = make_engine(ckpt, policy)
    plain = GenerationRequest("plain", list(PROMPT), SamplingParams(max_tokens=10, temperature=0))
    start = time.monotonic()
    outs = run(eng, steered("sync", "sync", max_tokens=6, timeout_s=0.3), plain)
    assert time.monotonic() - start < 20  # one 0.3 s timeout, never the Steerer's 30 s
    assert tokens(outs["sync"]) == hf_greedy(hf, PROMPT, 6) and tokens(outs["plain"])
    assert [i.action for o in outs["sync"] for i in o.interventions] == ["steerer_timeout"]
