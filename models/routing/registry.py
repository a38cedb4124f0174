"""Adapters loaded at run time (POST /v1/load_lora_adapter), recorded on disk.

Every Generator replica loads the recorded adapters at start and every Router replica trains
on their examples, so a replica that is new, restarted or added by autoscaling serves what was
loaded before it. One JSON file, `<state_dir>/adapters.json`; writers take a lock on it and
replace it whole, so concurrent Ingress replicas and readers never see half a file.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from models.routing.config import AdapterConfig

logger = logging.getLogger(__name__)


class AdapterRegistry:
    """The run-time adapters recorded under `state_dir` (None: nothing is recorded)."""

    def __init__(self, state_dir: str | None):
        self.path = Path(os.path.expanduser(state_dir)) / "adapters.json" if state_dir else None

    def load(self) -> list[AdapterConfig]:
        """The recorded adapters whose directory still exists (the others are logged)."""
        if self.path is None:
            return []
        adapters = self._read_all()
        present = [a for a in adapters if Path(a.path).is_dir()]
        for gone in (a for a in adapters if a not in present):
            logger.warning("recorded adapter '%s' is gone from %s; not loaded", gone.name, gone.path)
        return present

    def record(self, adapter: AdapterConfig) -> None:
        """Add (or replace) one adapter; its path must be absolute."""
        with self._edit() as adapters:
            adapters[adapter.name] = adapter.model_dump()

    def forget(self, name: str) -> None:
        with self._edit() as adapters:
            adapters.pop(name, None)

    @contextmanager
    def _edit(self):
        if self.path is None:
            yield {}
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            adapters = {a.name: a.model_dump() for a in self._read_all()}
            yield adapters
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"adapters": list(adapters.values())}, indent=1))
            tmp.replace(self.path)

    def _read_all(self) -> list[AdapterConfig]:
        if not self.path.is_file():
            return []
        try:
            return [AdapterConfig.model_validate(a)
                    for a in json.loads(self.path.read_text()).get("adapters", [])]
        except (OSError, ValueError) as exc:
            logger.warning("ignoring unreadable adapter record %s: %s", self.path, exc)
            return []


async def load_adapters(engine: Any, paths: dict[str, str], configured: list[AdapterConfig]):
    """Load `paths` (name -> directory) into `engine`. A configured adapter that fails raises;
    a recorded one is logged and dropped from `paths` (the replica serves the rest)."""
    configured_names = {a.name for a in configured}
    for name, path in list(paths.items()):
        try:
            await engine.load_adapter(name, path)
        except Exception:
            if name in configured_names:
                raise
            logger.exception("recorded adapter '%s' failed to load; skipped", name)
            del paths[name]


def adapter_paths(configured: list[AdapterConfig], state_dir: str | None, model: Any) -> dict:
    """Name -> directory of every adapter a replica starts with: those recorded at run time
    (loaded through the API before this replica came) and the configured ones."""
    from models.builtin import resolve_adapter

    return {a.name: os.path.expanduser(resolve_adapter(a.path, model))
            for a in [*AdapterRegistry(state_dir).load(), *configured]}  # fmt: skip
