"""Generator deployment: the big model behind a continuous-batching engine (GPU or CPU).

A thin shell: it builds the engine from the config, streams RequestOutputs to the Ingress,
aborts a request when its caller goes away, and wires the engine's step observer to the
Steerer (remote, one batched call per engine step) or to a colocated steering runtime.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from typing import Any

from ray import serve

from models.config import TandemConfig
from models.engine.types import AdapterNotFoundError, GenerationRequest, RequestOutput

logger = logging.getLogger("ray.serve")


class _SteeringObserver:
    """Routes each engine step's steered rows: colocated rows to the in-replica runtime, the
    rest in ONE call to the Steerer deployment."""

    def __init__(self, remote: Any | None, colocated: Any | None):
        self.remote = remote
        self.colocated = colocated
        self.modes: dict[str, str] = {}  # request id -> steering mode
        self.calls = 0

    async def on_step(self, batch: list) -> list:
        self.calls += 1
        local = [r for r in batch if self.modes.get(r.request_id) == "colocated"]
        remote = [r for r in batch if self.modes.get(r.request_id) != "colocated"]
        results = []
        jobs = []
        if local and self.colocated is not None:
            jobs.append(self.colocated.process(local))
        if remote and self.remote is not None:
            jobs.append(self.remote.process.remote(remote))
        for out in await asyncio.gather(*jobs):
            results.extend(out)
        return results

    async def release(self, request_ids: list[str]) -> None:
        if self.colocated is not None:
            self.colocated.release(request_ids)
        if self.remote is not None:
            await self.remote.release.remote(request_ids)


@serve.deployment(name="Generator")
class Generator:
    """Serves GenerationRequests from one engine replica."""

    def __init__(self, config: dict, steerer: Any | None = None):
        from models.builtin import resolve_source
        from models.engine import build_engine

        self.config = TandemConfig.model_validate(config)
        self.paths = resolve_source(self.config.model.source)
        self.engine = build_engine(self.config.engine, self.paths.big)
        self.steerer = steerer
        self.adapter_paths = self._configured_adapters()
        self._started = False
        self._start_lock = asyncio.Lock()

    def _configured_adapters(self) -> dict[str, str]:
        paths = {}
        for a in self.config.adapters:
            if a.path.startswith("builtin:"):
                name = a.path.removeprefix("builtin:")
                if name not in self.paths.adapters:
                    raise ValueError(
                        f"adapter '{a.name}': no builtin adapter '{name}' in "
                        f"{self.config.model.source}; builtin adapters: {', '.join(self.paths.adapters)}"
                    )
                paths[a.name] = self.paths.adapters[name]
            else:
                paths[a.name] = os.path.expanduser(a.path)
        return paths

    async def _ensure_started(self) -> None:
        if self._started:
            return
        async with self._start_lock:
            if self._started:
                return
            await self.engine.start()
            for name, path in self.adapter_paths.items():
                await self.engine.load_adapter(name, path)
            if self.steerer is not None and hasattr(self.engine, "set_step_observer"):
                self.engine.set_step_observer(_SteeringObserver(self.steerer, None))
            self._started = True

    async def generate(self, request: GenerationRequest) -> AsyncIterator[RequestOutput]:
        """Stream the engine's outputs for one request; abort it if the caller goes away."""
        await self._ensure_started()
        if request.adapter and request.adapter not in self.adapter_paths:
            raise AdapterNotFoundError(
                f"adapter '{request.adapter}' is not loaded; loaded: "
                f"{', '.join(self.adapter_paths) or 'none'}"
            )
        finished = False
        try:
            async for out in self.engine.generate(request):
                finished = out.finished
                yield out
        finally:
            if not finished:
                await self.engine.abort(request.request_id)

    async def adapters(self) -> list[str]:
        return sorted(self.adapter_paths)

    async def load_adapter(self, name: str, path: str) -> None:
        await self._ensure_started()
        await self.engine.load_adapter(name, path)
        self.adapter_paths[name] = path

    async def unload_adapter(self, name: str) -> None:
        if name not in self.adapter_paths:
            raise AdapterNotFoundError(
                f"adapter '{name}' is not loaded; loaded: {', '.join(self.adapter_paths) or 'none'}"
            )
        await self.engine.unload_adapter(name)
        del self.adapter_paths[name]

    async def stats(self) -> dict:
        s = self.engine.stats()
        return dict(s.__dict__)

    async def check_health(self) -> None:
        if self._started:
            await self.engine.check_health()
