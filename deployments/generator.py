"""Generator deployment: the big model behind a continuous-batching engine (GPU or CPU).

A thin shell: it builds the engine from the config, admits requests (`submit`), streams each
Ingress session's outputs as one message per engine step (`stream`, see streams.py), aborts a
request when its caller goes away, and hands the engine a step observer
(models/steering/observer.py) that answers steered rows in the replica or through the Steerer.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from typing import Any

from ray import serve
from ray.serve.config import RequestRouterConfig

from deployments.metrics import export_engine_stats
from deployments.streams import PinnedRouter, Sessions
from models.builtin import resolve_adapter, resolve_source
from models.config import TandemConfig
from models.engine import build_engine
from models.protocol.engine import check_capabilities
from models.protocol.errors import AdapterNotFoundError
from models.protocol.outputs import RequestOutput
from models.protocol.requests import GenerationRequest
from models.steering.config import SteeringSetup
from models.steering.observer import ReplicaObserver
from models.steering.policies import policy_needs
from models.steering.runtime import SteeringRuntime
from models.steering.vector_service import VectorService


@serve.deployment(
    name="Generator", request_router_config=RequestRouterConfig(request_router_class=PinnedRouter)
)
class Generator:
    """Serves GenerationRequests from one engine replica."""

    def __init__(self, config: dict, steerer: Any | None = None):
        self.config = c = TandemConfig.model_validate(config)
        self.paths = resolve_source(c.model.source)
        self.setup = SteeringSetup(steering=c.steering, model_source=c.model.source,
                                   max_model_len=c.engine.max_model_len)  # fmt: skip
        self.engine = build_engine(c.engine, self.paths.big, self.setup)
        self.policy_needs = policy_needs(c.steering.policies)
        self.colocates = bool(c.steering.policies) and self.engine.capabilities.token_events
        self.adapter_paths = {a.name: os.path.expanduser(resolve_adapter(a.path, self.paths))
                              for a in c.adapters}  # fmt: skip
        self.vectors = VectorService(c.steering, self.paths.big)
        self.observer = ReplicaObserver(steerer.process.remote if steerer else None,
                                        steerer.release.remote if steerer else None,
                                        lambda: SteeringRuntime.from_setup(self.setup))  # fmt: skip
        self.sessions = Sessions(c.server.stream_interval_s)
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
            for name, path in self.adapter_paths.items():
                await self.engine.load_adapter(name, path)
            if self.config.steering.policies:
                self.engine.set_step_observer(self.observer)
            self._metrics_task = asyncio.create_task(export_engine_stats(self.engine))
            self._started = True

    async def submit(self, request: GenerationRequest, session: str) -> tuple[str, Any]:
        """Admit one request for an Ingress session; raises the error it deserves. Returns
        this replica's id and the first output; the later ones go to the session's stream."""
        if not self._started:
            await self._ensure_started()
        if not self.vectors.registered([v.name for v in request.steer_vectors]):
            self.vectors.sync(self.engine)
        check_capabilities(self.engine, request, self.policy_needs)
        steering = request.steering
        if steering is not None and steering.mode == "colocated" and self.colocates:
            await self.observer.ensure_colocated()
        self.engine.check_request(request)
        self._requests_served += 1
        first = await self.sessions.submit(session, request.request_id, self._outputs(request))
        return self.replica, first

    async def _outputs(self, request: GenerationRequest) -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            async for out in self.engine.generate(request):
                finished = out.finished
                yield out
        finally:
            if not finished:
                await self.engine.abort(request.request_id)
            if request.steering is not None:
                await self.observer.release([request.request_id])

    async def stream(self, session: str, replica: str) -> AsyncIterator[list]:
        """The session's outputs, one item per engine step with output (pinned here)."""
        async for batch in self.sessions.stream(session):
            yield batch

    async def abort(self, request_id: str, replica: str) -> None:
        """Stop a request of this replica whose caller went away (pinned here)."""
        self.sessions.abort(request_id)

    async def adapters(self) -> list[str]:
        return sorted(self.adapter_paths)

    async def load_adapter(self, name: str, path: str) -> None:
        await self._ensure_started()
        await self.engine.load_adapter(name, path)
        self.adapter_paths[name] = path

    async def unload_adapter(self, name: str) -> None:
        if name not in self.adapter_paths:
            raise AdapterNotFoundError.naming(name, self.adapter_paths)
        await self.engine.unload_adapter(name)
        del self.adapter_paths[name]

    async def list_vectors(self) -> list[dict]:
        """The steering vectors this replica can apply, OpenAI-list style objects."""
        return self.vectors.describe()

    async def add_vector(self, name: str, data: bytes, filename: str) -> dict:
        """Validate and store an uploaded GGUF or safetensors vector, then apply it here."""
        self.vectors.add_upload(name, data, filename)
        if self._started:
            self.vectors.sync(self.engine)
        return self.vectors.describe(name)[0]

    async def extract_vector(self, name: str, positive: list[str], negative: list[str],
                             layers: list[int] | None, method: str) -> bytes:
        """Extract a vector from contrastive pairs on the big model; returns it as GGUF bytes."""
        return await asyncio.to_thread(
            self.vectors.extract_gguf, name, positive, negative, layers, method)

    async def stats(self) -> dict:
        """Engine counters plus this replica's identity and request count."""
        s = self.engine.stats()
        return {**s.__dict__, "replica": self.replica, "requests_served": self._requests_served,
                "sessions": len(self.sessions)}

    async def check_health(self) -> None:
        if self._started:
            await self.engine.check_health()
