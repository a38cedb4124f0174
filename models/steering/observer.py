"""The Generator replica's step observer: where each steered row of an engine step is answered.

Rows whose request asked for `colocated` go to a steering runtime inside the replica (loaded on
the first such request); every other row goes, in ONE call per engine step, to the Steerer
deployment. The mode rides in each row (RowEvents.mode), so nothing here keeps a side table.
Ray stays out: the Steerer is reached through the two async callables the deployment passes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from models.protocol.steering import PrefetchRow, RowActions, RowEvents, StepObserver
from models.steering.runtime import SteeringRuntime

RemoteProcess = Callable[[list[RowEvents]], Awaitable[list[RowActions]]]
RemoteRelease = Callable[[list[str]], Awaitable[None]]


class ReplicaObserver(StepObserver):
    """Splits each step's rows between the in-replica runtime and the Steerer deployment.

    remote_process / remote_release: the Steerer's calls (None: no Steerer). load_colocated:
    builds the in-replica runtime, called once in a worker thread on the first colocated row.
    """

    def __init__(
        self,
        remote_process: RemoteProcess | None,
        remote_release: RemoteRelease | None,
        load_colocated: Callable[[], SteeringRuntime],
    ):
        self.remote_process = remote_process
        self.remote_release = remote_release
        self.load_colocated = load_colocated
        self.colocated: SteeringRuntime | None = None
        self._loading = asyncio.Lock()
        self.calls = 0

    async def ensure_colocated(self) -> None:
        """Load the in-replica runtime unless it is there (the first colocated request)."""
        async with self._loading:
            if self.colocated is None:
                self.colocated = await asyncio.to_thread(self.load_colocated)

    async def on_step(self, rows: list[RowEvents]) -> list[RowActions]:
        self.calls += 1
        local = [r for r in rows if r.mode == "colocated"]
        remote = [r for r in rows if r.mode != "colocated"]
        jobs = []
        if local and self.colocated is not None:
            jobs.append(self.colocated.process(local))
        if remote and self.remote_process is not None:
            jobs.append(self.remote_process(remote))
        return [actions for answer in await asyncio.gather(*jobs) for actions in answer]

    def prefetch(self, rows: list[PrefetchRow]) -> None:
        """Colocated rows' small-model reads start beside the big model's forward (called in
        the engine's thread; see SteeringRuntime.prefetch)."""
        local = [r for r in rows if r.mode == "colocated"]
        if local and self.colocated is not None:
            self.colocated.prefetch(local)

    async def release(self, request_ids: list[str]) -> None:
        if self.colocated is not None:
            self.colocated.release(request_ids)
        if self.remote_release is not None:
            await self.remote_release(request_ids)
