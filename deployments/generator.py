"""Generator deployment: the big model behind a continuous-batching engine (GPU or CPU). A thin
shell: it builds the engine, admits requests (`submit`), streams each Ingress session's outputs
as one message per engine step (`stream`, streams.py), aborts a request whose caller went away,
and hands the engine a step observer (models/steering/observer.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

from ray import serve
from ray.serve.config import RequestRouterConfig

from deployments.generator_admin import GeneratorAdmin
from deployments.streams import FIRST_OUTPUT_WAIT_S, Listen, PinnedRouter, Sessions
from deployments.telemetry import GeneratorTelemetry
from models.builtin import resolve_source
from models.config import TandemConfig
from models.engine import build_engine
from models.protocol.engine import check_capabilities
from models.protocol.outputs import RequestOutput, Sink
from models.protocol.requests import GenerationRequest
from models.routing.registry import adapter_paths, load_adapters
from models.steering.config import SteeringSetup
from models.steering.drafter import attach_drafter
from models.steering.observer import CircuitBreaker, ReplicaObserver
from models.steering.policies import policy_needs
from models.steering.runtime import SteeringRuntime
from models.steering.vector_service import VectorService


@serve.deployment(
    name="Generator", request_router_config=RequestRouterConfig(request_router_class=PinnedRouter)
)
class Generator(GeneratorAdmin):
    """Serves GenerationRequests from one engine replica."""

    def __init__(self, config: dict, steerer: Any | None = None):
        self.config = c = TandemConfig.model_validate(config)
        self.paths = resolve_source(c.model.source)
        self.setup = SteeringSetup(steering=c.steering, model_source=c.model.source,
                                   max_model_len=c.engine.max_model_len)  # fmt: skip
        self.engine = build_engine(c.engine, self.paths.big, self.setup)
        self.policy_needs = policy_needs(c.steering.policies)
        self.colocates = bool(c.steering.policies) and self.engine.capabilities.token_events
        self.adapter_paths = adapter_paths(c.adapters, c.server.state_dir, self.paths)
        self.vectors = VectorService(c.steering, self.paths.big)
        remote = (steerer.process.remote, steerer.release.remote) if steerer else (None, None)
        self.observer = ReplicaObserver(*remote, lambda: SteeringRuntime.from_setup(self.setup),
                                        CircuitBreaker.from_config(c.steering))  # fmt: skip
        self.sessions = Sessions(c.server.stream_interval_s)
        self.telemetry = GeneratorTelemetry(c)
        self.replica = serve.get_replica_context().replica_id.unique_id
        self._requests_served = 0
        self._started = False
        self._start_lock = asyncio.Lock()

    async def _ensure_started(self) -> None:
        async with self._start_lock:
            if self._started:
                return
            await self.engine.start()
            self.vectors.sync(self.engine)
            await load_adapters(self.engine, self.adapter_paths, self.config.adapters)
            await attach_drafter(self.engine, self.setup, self.config.engine.speculative)
            if self.config.steering.policies:
                self.engine.set_step_observer(self.telemetry.observer(self.observer))
            self._metrics_task = asyncio.create_task(self.telemetry.export(self.engine))
            self._started = True

    async def submit(self, requests: list[GenerationRequest], session: str,
                     wait_s: float = FIRST_OUTPUT_WAIT_S) -> tuple[str, list]:  # fmt: skip
        """Admit a burst of an Ingress session's requests: this replica's id and per request
        the error that refused it, its first output if it came in `wait_s`, or None (streams)."""
        if not self._started:
            await self._ensure_started()
        admitted, refused = [], {}
        for request in requests:
            try:
                await self._admit(request)
                admitted.append((request.request_id, self._listen(request)))
            except Exception as exc:  # noqa: BLE001 - it refuses that request alone
                refused[request.request_id] = exc
        try:
            firsts = iter(await self.sessions.submit(session, admitted, wait_s))
        except asyncio.CancelledError:  # the call was withdrawn: its callers left
            for request_id, _ in admitted:
                self.sessions.abort(request_id)
            raise
        return self.replica, [refused.get(r.request_id) or next(firsts) for r in requests]

    async def _admit(self, request: GenerationRequest) -> None:
        if not self.vectors.registered([v.name for v in request.steer_vectors]):
            self.vectors.sync(self.engine)
        check_capabilities(self.engine, request, self.policy_needs)
        if self.colocates and request.steering and request.steering.mode == "colocated":
            await self.observer.ensure_colocated()
        self.engine.check_request(request)
        self._requests_served += 1

    def _listen(self, request: GenerationRequest) -> Listen:
        """`request` into the engine, outputs timed on their way; its steering state freed at the end."""

        def listen(sink: Sink) -> Callable[[], None]:
            watch, ended = self.telemetry.watch(request), []

            def end() -> None:
                if not ended:
                    ended.append(True)
                    if watch is not None:
                        watch.close()
                    if request.steering is not None:
                        asyncio.create_task(self.observer.release([request.request_id]))

            def on_output(item: RequestOutput | BaseException) -> None:
                if watch is not None and isinstance(item, RequestOutput):
                    watch(item)
                if isinstance(item, BaseException) or item.finished:
                    end()
                sink(item)

            stop_engine = self.engine.listen(request, on_output)

            def stop() -> None:
                stop_engine()
                end()

            return stop

        return listen

    async def stream(self, session: str, replica: str) -> AsyncIterator[list]:
        """The session's outputs, one item per engine step with output (pinned here)."""
        async for batch in self.sessions.stream(session):
            yield batch

    async def abort(self, request_id: str, replica: str) -> None:  # its caller left (pinned)
        self.sessions.abort(request_id)

    async def trace(self, request_id: str) -> dict | None:
        return self.telemetry.traces.get(request_id)  # None: not here or expired

    async def stats(self) -> dict:  # engine counters, this replica's id and request count
        return {**self.engine.stats().__dict__, "replica": self.replica,
                "requests_served": self._requests_served, "sessions": len(self.sessions)}

    async def check_health(self) -> None:
        if self._started:
            await self.engine.check_health()
