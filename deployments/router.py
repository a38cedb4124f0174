"""Ray Serve deployment of the adapter router (CPU): prompt -> adapter decision, batched.

Built from the config's `adapters:` list and `router:` block (plain dicts, as serve_config.yaml
passes them), e.g. `Router.options(**opts).bind(adapters=[...], router={...})`.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from ray import serve

from deployments.telemetry import record_route
from models.routing.config import AdapterConfig, RouterConfig
from models.routing.registry import AdapterRegistry
from models.routing.router import AdapterRouter


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=64)
class Router:
    """Routes prompts to LoRA adapters; concurrent calls share one embedding batch."""

    def __init__(
        self, adapters: list[dict[str, Any]] | None = None, router: dict[str, Any] | None = None,
        state_dir: str | None = None,
    ):
        self.config = RouterConfig.model_validate(router or {})
        configs = [AdapterConfig.model_validate(a) for a in adapters or []]
        names = {a.name for a in configs}  # and those loaded through the API before it came:
        configs += [a for a in AdapterRegistry(state_dir).load() if a.name not in names]
        self.router = AdapterRouter(configs, self.config)  # loads the embedder only if needed
        self.batches = 0
        self.max_batch_size_seen = 0

    async def route(self, prompt: str) -> dict[str, Any]:
        """One prompt's decision: adapter (None = base), confidence, candidates, weights."""
        started = time.perf_counter()
        if not self.router.routable:
            decision = {"adapter": None, "confidence": 0.0, "candidates": [], "weights": None}
        else:
            decision = await self._route_batch(prompt)
        record_route([decision], started)
        return decision

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def _route_batch(self, prompts: list[str]) -> list[dict[str, Any]]:
        self.batches += 1
        self.max_batch_size_seen = max(self.max_batch_size_seen, len(prompts))
        # embedding is CPU-bound: off the event loop, so the next batch can gather meanwhile
        decisions = await asyncio.to_thread(self.router.route, prompts)
        return [d.to_dict() for d in decisions]

    async def add_adapter(self, adapter: dict[str, Any]) -> None:
        """Learn (or relearn) an adapter loaded at run time: the head is retrained."""
        new = AdapterConfig.model_validate(adapter)
        await self._retrain([*(a for a in self.router.adapters if a.name != new.name), new])

    async def remove_adapter(self, name: str) -> None:
        await self._retrain([a for a in self.router.adapters if a.name != name])

    async def _retrain(self, adapters: list[AdapterConfig]) -> None:
        embedder = self.router.embedder  # kept: loading it again costs seconds
        self.router = await asyncio.to_thread(AdapterRouter, adapters, self.config, embedder)

    def info(self) -> dict[str, Any]:
        """The adapters this router knows, its settings, and batching counters."""
        return {
            "adapters": self.router.info(),
            "router": self.config.model_dump(),
            "embedder_loaded": self.router.embedder is not None,
            "batches": self.batches,
            "max_batch_size_seen": self.max_batch_size_seen,
        }
