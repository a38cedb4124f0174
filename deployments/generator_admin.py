"""The Generator's admin methods: adapters and steering vectors at runtime (the admin routes,
deployments/admin_api.py, call them on every replica)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from models.protocol.errors import AdapterNotFoundError


class GeneratorAdmin:
    """Mixed into the Generator deployment: needs its engine, adapter_paths, vectors."""

    engine: Any
    adapter_paths: dict[str, str]
    vectors: Any
    _started: bool

    _ensure_started: Callable[[], Awaitable[None]]  # the Generator's own

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

    async def remove_vector(self, name: str) -> None:
        self.vectors.remove(name)

    async def extract_vector(self, name: str, positive: list[str], negative: list[str],
                             layers: list[int] | None, method: str) -> bytes:
        """Extract a vector from contrastive pairs on the big model; returns it as GGUF bytes."""
        return await asyncio.to_thread(self.vectors.extract_gguf, name, positive, negative,
                                       layers, method)  # fmt: skip

