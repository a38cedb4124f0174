"""The Steerer deployment in a real Ray Serve app: calls from several Generator replicas that
arrive together are batched into one runtime call, and answers match an in-process runtime."""

from __future__ import annotations

import asyncio

import pytest
import torch

from models.protocol.steering import AdjustedLogits, ForwardPass, Prefilled, RowEvents, Sampled
from models.steering.config import SteeringConfig
from models.steering.runtime import SteeringRuntime

pytestmark = pytest.mark.serve

STEERING = {
    "expert_adapter": "positive",
    "policies": [{"name": "proxy", "kind": "proxy_tuning", "params": {"alpha": 1.0}}],
}


@pytest.fixture(scope="module")
def steerer(serve_url):
    from ray import serve

    from deployments.steerer import Steerer

    app = Steerer.options(ray_actor_options={"num_cpus": 0.5}).bind(STEERING, "builtin:tiny")
    yield serve.run(app, name="steerer", route_prefix=None)
    serve.delete("steerer")


def test_calls_from_several_replicas_share_one_runtime_call(steerer):
    local = SteeringRuntime.from_source(SteeringConfig.model_validate(STEERING), "builtin:tiny")
    prompts = {f"r{i}": [5 + i, 9, 12, 40 + i] for i in range(6)}

    async def step(events_for) -> list:
        # three "Generator replicas", two rows each, calling at the same moment
        calls = [
            [RowEvents(rid, events_for(rid), "proxy") for rid in list(prompts)[k : k + 2]]
            for k in range(0, 6, 2)
        ]
        return await asyncio.gather(*(steerer.process.remote(call) for call in calls))

    async def main():
        first = await step(lambda rid: [Prefilled(prompts[rid]), ForwardPass(0)])
        second = await step(lambda rid: [Sampled(0, 3), ForwardPass(1)])
        return first, second

    before = steerer.stats.remote().result()
    first, second = asyncio.run(main())
    after = steerer.stats.remote().result()
    assert after["rows"] - before["rows"] == 12
    assert after["calls"] - before["calls"] < 6, "concurrent calls were not batched"

    want = local.process_now(
        [RowEvents(rid, [Prefilled(p), ForwardPass(0)], "proxy") for rid, p in prompts.items()]
    )
    got = [a for call in first for a in call]
    assert [a.request_id for a in got] == list(prompts)
    for g, w in zip(got, want, strict=True):
        assert isinstance(g.actions[0], AdjustedLogits) and g.actions[0].step == 0
        torch.testing.assert_close(g.actions[0].delta, w.actions[0].delta, atol=1e-4, rtol=1e-4)
    assert all(a.actions[0].step == 1 for call in second for a in call)

    steerer.release.remote(list(prompts)).result()
    assert steerer.stats.remote().result()["live_requests"] == 0
    # a replica that lost the state asks for a resync
    (lost,) = steerer.process.remote([RowEvents("r0", [ForwardPass(2)], "proxy")]).result()
    assert lost.resync
