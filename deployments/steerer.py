"""Steerer deployment: the small model and the steering policies, shared by Generator replicas.

A thin shell over models.steering.runtime.SteeringRuntime. `process(rows)` is one engine
step's steered rows from one Generator replica; `@serve.batch` gathers the calls of several
replicas that arrive together into one runtime call, so they share one small-model forward.
"""

from __future__ import annotations

import logging
from typing import Any

from ray import serve

from models.protocol.steering import RowActions, RowEvents
from models.steering.config import SteeringConfig

logger = logging.getLogger("ray.serve")

MAX_BATCHED_CALLS = 32  # Generator replicas' step calls merged into one forward
BATCH_WAIT_S = 0.001  # how long a call waits for others: short, a sync step waits on it


@serve.deployment(name="Steerer")
class Steerer:
    """Turns engine-step events into actions for every Generator replica.

    config: the whole Tandem config as a dict (its `steering` block and `model.source`), or a
    SteeringConfig dict with `model_source` naming the big model (builtin:… or a directory).
    """

    def __init__(self, config: dict[str, Any], model_source: str | None = None):
        from models.steering.runtime import SteeringRuntime

        if "steering" in config or "model" in config:
            from models.config import TandemConfig

            full = TandemConfig.model_validate(config)
            steering, source = full.steering, model_source or full.model.source
            max_len = full.engine.max_model_len
        else:
            if model_source is None:
                raise ValueError("Steerer: a bare steering config needs model_source")
            steering, source = SteeringConfig.model_validate(config), model_source
            max_len = None
        self.runtime = SteeringRuntime.from_source(steering, source, max_len)
        logger.info("Steerer ready: policies %s", ", ".join(self.runtime.policies) or "none")

    @serve.batch(max_batch_size=MAX_BATCHED_CALLS, batch_wait_timeout_s=BATCH_WAIT_S)
    async def process(self, calls: list[list[RowEvents]]) -> list[list[RowActions]]:
        """One engine step's rows per call -> that call's actions, row for row."""
        rows = [row for call in calls for row in call]
        # the answers are pickled back to the Generators: no tensor may drag a batch with it
        answers = {a.request_id: a.owning_tensors() for a in await self.runtime.process(rows)}
        return [
            [answers.get(r.request_id) or RowActions(r.request_id, resync=True) for r in call]
            for call in calls
        ]

    async def release(self, request_ids: list[str]) -> None:
        """Forget finished requests."""
        self.runtime.release(request_ids)

    async def stats(self) -> dict:
        return dict(vars(self.runtime.stats()))

    async def check_health(self) -> None:
        if self.runtime.policies and self.runtime.small_model is None:
            raise RuntimeError("the Steerer has policies but no small model")
