"""The floors hold: no import runs up the layers (DESIGN.md section 2), and no room outgrows
what a reader takes in at once. Reads the source with `ast`, imports nothing."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# package -> packages it must never import (a prefix match on the imported module's name)
FORBIDDEN = {
    "models.protocol": ["models.engine", "models.steering", "models.openai", "models.routing",
                        "models.retrieval", "models.builtin", "models.config", "deployments", "ray"],
    "models.engine": ["models.steering", "models.openai", "models.routing", "models.retrieval",
                      "models.builtin", "deployments", "ray"],
    "models.retrieval": ["models.builtin", "models.engine", "models.steering", "deployments",
                         "ray"],
    "models.routing": ["models.steering", "models.openai", "deployments", "ray"],
    "models.steering": ["models.openai", "deployments", "ray"],
    "models.engines": ["models.openai", "models.routing", "models.retrieval", "deployments",
                       "ray"],
    "models.openai": ["deployments", "ray"],
    "models.activations": ["models.openai", "models.engine", "models.routing",
                           "models.retrieval", "deployments", "ray"],
    "models.structured": ["models.engine", "models.steering", "models.openai", "models.routing",
                          "models.retrieval", "models.builtin", "models.config", "deployments",
                          "ray"],
    "models": ["deployments", "ray"],
}
MAX_MODULE_LINES = 620  # models/: about 600
MAX_DEPLOYMENT_LINES = 150


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """Every module a file imports (at any depth: lazy imports count), with its line."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return found


def sources(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def violations(files: list[Path]) -> list[str]:
    bad = []
    for path in files:
        name = module_name(path)
        rules = [(pkg, banned) for pkg, banned in FORBIDDEN.items()
                 if name == pkg or name.startswith(pkg + ".")]  # fmt: skip
        for line, target in imported_modules(path):
            for pkg, banned in rules:
                hit = next((b for b in banned if target == b or target.startswith(b + ".")), None)
                if hit:
                    bad.append(f"{path.relative_to(ROOT)}:{line} imports {target} ({pkg} must "
                               f"not import {hit})")
    return bad


def test_no_import_runs_up_the_layers():
    assert violations(sources("models")) == []


def test_the_check_catches_an_upward_import():
    room = ROOT / "models" / "engine" / "_layer_probe.py"
    room.write_text("from models.steering.runtime import SteeringRuntime\n")
    try:
        assert any("_layer_probe.py:1" in v for v in violations([room]))
    finally:
        room.unlink()


def line_limit(path: Path) -> int:
    """A deployment (a file with @serve.deployment) is a thin shell; the rest about 600."""
    return MAX_DEPLOYMENT_LINES if "@serve.deployment" in path.read_text() else MAX_MODULE_LINES


@pytest.mark.parametrize("folder", ["models", "deployments"])
def test_rooms_stay_small(folder):
    long = {str(p.relative_to(ROOT)): n for p in sources(folder)
            if (n := len(p.read_text().splitlines())) > line_limit(p)}  # fmt: skip
    assert long == {}, f"over their limit: {long}"
