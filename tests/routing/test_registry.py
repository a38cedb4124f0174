"""The on-disk record of adapters loaded at run time (models/routing/registry.py)."""

from __future__ import annotations

import asyncio

import pytest

from models.routing.config import AdapterConfig
from models.routing.registry import AdapterRegistry, load_adapters


def test_record_forget_and_reload(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    registry = AdapterRegistry(str(tmp_path / "state"))
    assert registry.load() == []
    registry.record(AdapterConfig(name="a", path=str(tmp_path / "a"), examples=["x"]))
    registry.record(AdapterConfig(name="b", path=str(tmp_path / "b")))
    registry.record(AdapterConfig(name="a", path=str(tmp_path / "a"), examples=["y"]))  # replaces
    again = AdapterRegistry(str(tmp_path / "state")).load()  # another replica reads the file
    assert [(a.name, a.examples) for a in again] == [("a", ["y"]), ("b", [])]
    registry.forget("a")
    (tmp_path / "b").rmdir()  # an adapter whose directory went away is not loaded
    assert AdapterRegistry(str(tmp_path / "state")).load() == []
    assert AdapterRegistry(None).load() == []  # no state_dir: nothing recorded
    AdapterRegistry(None).record(AdapterConfig(name="a", path="/nowhere"))


def test_an_unreadable_record_is_ignored(tmp_path):
    (tmp_path / "adapters.json").write_text("{not json")
    assert AdapterRegistry(str(tmp_path)).load() == []


class _Engine:
    def __init__(self):
        self.loaded = []

    async def load_adapter(self, name, path):
        if path == "bad":
            raise ValueError("broken adapter")
        self.loaded.append(name)


def test_a_recorded_adapter_that_fails_is_skipped_a_configured_one_raises():
    engine, paths = _Engine(), {"good": "ok", "recorded": "bad"}
    asyncio.run(load_adapters(engine, paths, [AdapterConfig(name="good", path="ok")]))
    assert engine.loaded == ["good"] and paths == {"good": "ok"}
    with pytest.raises(ValueError):
        asyncio.run(load_adapters(engine, {"conf": "bad"}, [AdapterConfig(name="conf", path="x")]))
