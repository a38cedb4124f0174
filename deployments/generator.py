"""Generator deployment: the big model behind a continuous-batching engine (GPU or CPU).

A thin shell: it builds the engine from the config, streams RequestOutputs to the Ingress,
aborts a request when its caller goes away, and wires the engine's step observer to the
Steerer (remote, one batched call per engine step) or to a colocated steering runtime.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from ray import serve

from models.config import TandemConfig
from models.engine.types import AdapterNotFoundError, GenerationRequest, RequestOutput
from models.errors import TandemError

logger = logging.getLogger("ray.serve")


class VectorUploadError(TandemError):
    """A steering vector upload or extraction that cannot be used (bad file, wrong shape)."""

    code = "invalid_steering_vector"


class VectorFileTypeError(VectorUploadError):
    """An uploaded steering vector that is neither GGUF nor safetensors."""

    status_code = 415


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

    def prefetch(self, rows: list) -> None:
        """Colocated rows' small-model reads start beside the big model's forward (the engine
        calls this in its own thread; see SteeringRuntime.prefetch)."""
        local = [r for r in rows if self.modes.get(r[0]) == "colocated"]
        if local and self.colocated is not None:
            self.colocated.prefetch(local)

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
        self.vectors = self._vector_library()
        self._registered_vectors: set[str] = set()
        self._observer: _SteeringObserver | None = None
        self._requests_served = 0
        self._started = False
        self._start_lock = asyncio.Lock()

    async def _start_colocated(self) -> None:
        """Load the steering runtime into this replica, on the first `colocated` request."""
        from models.steering.runtime import SteeringRuntime

        async with self._start_lock:
            if self._observer.colocated is None:
                self._observer.colocated = await asyncio.to_thread(
                    SteeringRuntime.from_source,
                    self.config.steering,
                    self.config.model.source,
                    self.config.engine.max_model_len,
                )

    def _vector_library(self):
        from models.steering.runtime import default_vector_dir
        from models.steering.vectors import VectorLibrary, ensure_default_vectors

        shape = json.loads((Path(self.paths.big) / "config.json").read_text())
        root = self.config.steering.vector_dir or default_vector_dir(self.paths.big)
        library = VectorLibrary(root, shape["num_hidden_layers"], shape["hidden_size"])
        ensure_default_vectors(self.config.steering, self.paths.big, library)
        return library

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
            self._sync_vectors()
            for name, path in self.adapter_paths.items():
                await self.engine.load_adapter(name, path)
            if self.config.steering.policies:
                self._observer = _SteeringObserver(self.steerer, None)
                self.engine.set_step_observer(self._observer)
            self._metrics_task = asyncio.create_task(self._export_metrics())
            self._started = True

    async def _export_metrics(self, period_s: float = 1.0) -> None:
        """Engine counters as Ray metrics (Ray dashboard / Prometheus), once a second."""
        from ray.serve import metrics

        gauges = {
            name: metrics.Gauge(f"tandem_engine_{name}", description=desc)
            for name, desc in [
                ("num_running", "Sequences in the running batch."),
                ("num_waiting", "Requests waiting for KV-cache space or a batch slot."),
                ("free_blocks", "Free KV-cache blocks."),
                ("generated_tokens", "Tokens generated since start."),
                ("steps", "Engine steps since start."),
                ("observer_calls", "Steerer calls since start (one per steered step)."),
            ]
        }
        while True:
            stats = self.engine.stats()
            for name, gauge in gauges.items():
                gauge.set(float(getattr(stats, name, 0) or 0))
            await asyncio.sleep(period_s)

    def _sync_vectors(self) -> None:
        """Register with the engine every library vector it does not have yet."""
        for name in self.vectors.list():
            if name not in self._registered_vectors:
                vector = self.vectors.get(name)
                self.engine.register_vector(name, vector.as_tensor(self.vectors.num_layers))
                self._registered_vectors.add(name)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[RequestOutput]:
        """Stream the engine's outputs for one request; abort it if the caller goes away."""
        await self._ensure_started()
        if any(v.name not in self._registered_vectors for v in request.steer_vectors):
            self._sync_vectors()
        if request.steering and self._observer is not None:
            mode = request.steering.get("mode", "async")
            if mode == "colocated" and self._observer.colocated is None:
                await self._start_colocated()
            self._observer.modes[request.request_id] = mode
        if request.adapter and request.adapter not in self.adapter_paths:
            raise AdapterNotFoundError(
                f"adapter '{request.adapter}' is not loaded; loaded: "
                f"{', '.join(self.adapter_paths) or 'none'}"
            )
        finished = False
        self._requests_served += 1
        try:
            async for out in self.engine.generate(request):
                finished = out.finished
                yield out
        finally:
            if not finished:
                await self.engine.abort(request.request_id)
            if request.steering and self._observer is not None:
                self._observer.modes.pop(request.request_id, None)
                await self._observer.release([request.request_id])

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

    async def list_vectors(self) -> list[dict]:
        """The steering vectors this replica can apply, OpenAI-list style objects."""
        out = []
        for name in self.vectors.list():
            v = self.vectors.get(name)
            out.append({"id": name, "object": "steering.vector", "name": name, "layers": v.layers,
                        "hidden_size": v.hidden_size, "model_hint": v.model_hint,
                        "metadata": v.metadata})
        return out

    async def add_vector(self, name: str, data: bytes, filename: str) -> dict:
        """Validate and store an uploaded GGUF or safetensors vector, then apply it here."""
        from models.steering.vectors import load_vector

        suffix = Path(filename).suffix.lower()
        if suffix not in (".gguf", ".safetensors"):
            raise VectorFileTypeError(
                f"steering vector files must be .gguf or .safetensors, got '{filename}'"
            )
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"upload{suffix}"
            path.write_bytes(data)
            try:
                vector = load_vector(path, name)
            except Exception as exc:
                raise VectorUploadError(f"cannot read steering vector '{filename}': {exc}") from None
        try:
            self.vectors.add(vector)
        except ValueError as exc:
            raise VectorUploadError(str(exc)) from None
        self._registered_vectors.discard(name)
        if self._started:
            self._sync_vectors()
        return next(v for v in await self.list_vectors() if v["name"] == name)

    async def extract_vector(self, name: str, positive: list[str], negative: list[str],
                             layers: list[int] | None, method: str) -> bytes:
        """Extract a vector from contrastive pairs on the big model; returns it as GGUF bytes."""
        from models.steering.vectors import (
            extract_vector,
            load_transformers_model,
            save_gguf,
            transformers_hidden_states,
        )

        def run() -> bytes:
            model, tokenizer = load_transformers_model(self.paths.big)
            vector = extract_vector(name, transformers_hidden_states(model, tokenizer), positive,
                                    negative, layers=layers, method=method,
                                    model_hint=getattr(model.config, "model_type", ""))
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "v.gguf"
                save_gguf(vector, path)
                return path.read_bytes()

        try:
            return await asyncio.to_thread(run)
        except ValueError as exc:
            raise VectorUploadError(str(exc)) from None

    async def stats(self) -> dict:
        """Engine counters plus this replica's identity and request count."""
        s = self.engine.stats()
        replica = serve.get_replica_context().replica_id.unique_id
        return {**s.__dict__, "replica": replica, "requests_served": self._requests_served}

    async def check_health(self) -> None:
        if self._started:
            await self.engine.check_health()
