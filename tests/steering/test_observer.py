"""The Generator replica's step observer against a Steerer that fails: its circuit breaker
stops consulting a dead Steerer after repeated failures, says so on every row it leaves
unsteered, and tries again after the cool-down. Driven by the real torch engine on a tiny
checkpoint; the remote Steerer is a stand-in callable (the deployment passes Ray's)."""

from __future__ import annotations

import asyncio
import time

import pytest

from models.engine.config import EngineConfig
from models.engine.llm_engine import LLMEngine
from models.engine.tiny_checkpoint import build_tiny_checkpoint
from models.protocol.requests import GenerationRequest, SamplingParams
from models.protocol.steering import RowActions, SteeringRequest
from models.steering.observer import CircuitBreaker, ReplicaObserver


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_breaker_opens_after_failures_in_a_row_and_probes_after_the_cooldown():
    clock = Clock()
    breaker = CircuitBreaker(failures=3, cooldown_s=30, clock=clock)
    for _ in range(2):
        assert breaker.allow()
        breaker.failure()
    breaker.success()  # not in a row: closed again
    for _ in range(3):
        assert breaker.allow()
        breaker.failure()
    assert not breaker.allow() and "failed 3 calls in a row" in breaker.reason()
    assert "another 30 s" in breaker.reason()
    clock.now += 31
    assert breaker.allow()  # the probe
    assert not breaker.allow()  # the others wait for it
    breaker.failure()
    clock.now += 31
    assert breaker.allow()
    breaker.success()
    assert breaker.allow() and breaker.allow() and breaker.times_opened == 1


class Steerer:
    """A stand-in for the Steerer deployment's `process`: answers nothing, raises, or hangs."""

    def __init__(self):
        self.mode = "ok"
        self.calls = 0

    async def process(self, rows):
        self.calls += 1
        if self.mode == "raise":
            raise ConnectionError("Steerer replica is gone")
        if self.mode == "hang":
            await asyncio.sleep(60)
        return [RowActions(r.request_id) for r in rows]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build_tiny_checkpoint(tmp_path_factory.mktemp("observer"), "qwen3", seed=2)


def generate(eng, *requests):
    for r in requests:
        eng.add_request(r)
    outs = {}
    while eng.has_unfinished():
        for out in eng.step():
            outs.setdefault(out.request_id, []).append(out)
    return outs


def steered(rid, mode="sync", timeout_s=0.2):
    return GenerationRequest(rid, [11, 22, 33], SamplingParams(max_tokens=4, temperature=0),
                             steering=SteeringRequest("p", mode=mode, timeout_s=timeout_s))


@pytest.mark.parametrize("failure", ["raise", "hang"])
def test_a_dead_steerer_is_left_out_after_repeated_failures(ckpt, failure):
    steerer, clock = Steerer(), Clock()
    observer = ReplicaObserver(steerer.process, None, lambda: None,
                               CircuitBreaker(failures=2, cooldown_s=30, clock=clock))
    eng = LLMEngine(EngineConfig(num_kv_blocks=64, block_size=4), ckpt)
    eng.set_step_observer(observer)
    steerer.mode = failure
    first = generate(eng, steered("a"), steered("b"))  # one call for both: fails
    second = generate(eng, steered("c"))  # the second failure: the breaker opens
    kind = "steerer_timeout" if failure == "hang" else "steerer_error"
    for rid, outs in {**first, **second}.items():
        assert [i.action for o in outs for i in o.interventions] == [kind], rid
    assert steerer.calls == 2
    start = time.monotonic()
    third = generate(eng, steered("d", timeout_s=15), steered("e", "async", timeout_s=15))
    assert time.monotonic() - start < 12  # no call made, so no 15 s timeout waited for
    assert steerer.calls == 2
    for outs in third.values():
        (flag,) = [i for o in outs for i in o.interventions]
        assert flag.action == "steerer_unavailable" and "not consulted" in flag.detail["message"]
        assert outs[-1].finish_reason == "length"
    steerer.mode, clock.now = "ok", clock.now + 31  # back, and the cool-down is over
    fourth = generate(eng, steered("f"))
    assert steerer.calls > 2 and not [i for o in fourth["f"] for i in o.interventions]
    assert observer.breaker.closed
