"""The Generator replica's step observer: where each steered row of an engine step is answered.

Rows whose request asked for `colocated` go to a steering runtime inside the replica (loaded on
the first such request); every other row goes, in ONE call per engine step, to the Steerer
deployment, behind a circuit breaker: after `breaker_failures` calls in a row that failed or
that the engine gave up waiting for (steering.timeout_s), the Steerer is not consulted for
`breaker_cooldown_s` and its rows are answered at once as unsteered ("unavailable"), so a dead
Steerer costs no step its timeout. The mode rides in each row (RowEvents.mode), so nothing here
keeps a side table. Ray stays out: the Steerer is reached through the two async callables the
deployment passes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from models.protocol.steering import PrefetchRow, RowActions, RowEvents, StepObserver
from models.steering.config import SteeringConfig
from models.steering.runtime import SteeringRuntime

RemoteProcess = Callable[[list[RowEvents]], Awaitable[list[RowActions]]]
RemoteRelease = Callable[[list[str]], Awaitable[None]]
log = logging.getLogger(__name__)


class CircuitBreaker:
    """Closed while calls succeed; open for `cooldown_s` after `failures` failures in a row;
    then half-open: one call goes through, and its outcome closes or reopens it."""

    def __init__(self, failures: int = 3, cooldown_s: float = 30.0, clock=time.monotonic):
        self.failures, self.cooldown_s, self.clock = failures, cooldown_s, clock
        self.failed = 0  # failures in a row
        self.open_until = 0.0
        self.times_opened = 0

    @classmethod
    def from_config(cls, config: SteeringConfig) -> CircuitBreaker:
        return cls(config.breaker_failures, config.breaker_cooldown_s)

    @property
    def closed(self) -> bool:
        return self.failed < self.failures

    def allow(self) -> bool:
        """Whether to make the call now (a half-open probe holds the others back)."""
        if self.closed:
            return True
        now = self.clock()
        if now < self.open_until:
            return False
        self.open_until = now + self.cooldown_s  # this call is the probe
        return True

    def success(self) -> None:
        self.failed = 0

    def failure(self) -> None:
        self.failed += 1
        if self.failed == self.failures:
            self.times_opened += 1
            log.warning("the Steerer failed %d calls in a row; not consulted for %.0f s",
                        self.failed, self.cooldown_s)  # fmt: skip
        if self.failed >= self.failures:
            self.open_until = self.clock() + self.cooldown_s

    def reason(self) -> str:
        left = max(0.0, self.open_until - self.clock())
        return (f"the Steerer failed {self.failed} calls in a row; it is not consulted for "
                f"another {left:.0f} s (steering.breaker_cooldown_s)")  # fmt: skip


class ReplicaObserver(StepObserver):
    """Splits each step's rows between the in-replica runtime and the Steerer deployment.

    remote_process / remote_release: the Steerer's calls (None: no Steerer). load_colocated:
    builds the in-replica runtime, called once in a worker thread on the first colocated row.
    breaker: guards the remote calls (default: 3 failures, 30 s).
    """

    def __init__(
        self,
        remote_process: RemoteProcess | None,
        remote_release: RemoteRelease | None,
        load_colocated: Callable[[], SteeringRuntime],
        breaker: CircuitBreaker | None = None,
    ):
        self.remote_process = remote_process
        self.remote_release = remote_release
        self.load_colocated = load_colocated
        self.breaker = breaker or CircuitBreaker()
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
            jobs.append(self._remote(remote))
        return [actions for answer in await asyncio.gather(*jobs) for actions in answer]

    async def _remote(self, rows: list[RowEvents]) -> list[RowActions]:
        """The Steerer's answer, or each row's error when it fails or its breaker is open."""
        if not self.breaker.allow():
            reason = self.breaker.reason()
            return [RowActions(r.request_id, error=reason, unavailable=True) for r in rows]
        try:
            answers = await self.remote_process(rows)
        except asyncio.CancelledError:  # the engine stopped waiting: steering.timeout_s
            self.breaker.failure()
            raise
        except Exception as exc:  # noqa: BLE001 - its rows go on unsteered, and say why
            self.breaker.failure()
            return [RowActions(r.request_id, error=f"the Steerer failed: {exc!r}") for r in rows]
        self.breaker.success()
        return answers

    def prefetch(self, rows: list[PrefetchRow]) -> None:
        """Colocated rows' small-model reads start beside the big model's forward (called in
        the engine's thread; see SteeringRuntime.prefetch)."""
        local = [r for r in rows if r.mode == "colocated"]
        if local and self.colocated is not None:
            self.colocated.prefetch(local)

    async def release(self, request_ids: list[str]) -> None:
        if self.colocated is not None:
            self.colocated.release(request_ids)
        if self.remote_release is not None and self.breaker.closed:
            try:
                await self.remote_release(request_ids)
            except Exception:  # noqa: BLE001 - a Steerer that is gone has nothing to forget
                log.debug("releasing %s on the Steerer failed", request_ids, exc_info=True)
