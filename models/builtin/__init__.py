"""Built-in offline models: where a `model.source` string points on disk.

- `builtin:tiny`: random-weight Qwen3 models (big: hidden 128 x 4 layers; small: 64 x 2) with
  random non-zero LoRA adapters, built deterministically on first use and cached.
- `builtin:toy`: the models trained on the toy world (models/builtin/world.py), shipped in the
  repo under models/builtin/weights/toy/; their adapters do the tasks rewrite / qa / list and the
  small model's `positive` adapter is the proxy-tuning expert.
- `builtin:tiny-small`, `builtin:toy-small`: the small model alone (as `big`).
- a directory laid out like the toy models (big/, small/, adapters/, small_adapters/).
- anything else: a checkpoint directory holding config.json, returned as is.

All built-in models share one tokenizer (weights/tokenizer/) with a Qwen-style chat template.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

TOY_DIR = Path(__file__).parent / "weights" / "toy"


class ModelSourceError(ValueError):
    """A model source string names nothing usable; the message says what was expected."""


@dataclass
class ModelPaths:
    """Directories of a model source: the big model, the small model, and their LoRA adapters."""

    big: str
    small: str | None = None
    adapters: dict[str, str] = field(default_factory=dict)
    small_adapters: dict[str, str] = field(default_factory=dict)


def resolve_source(source: str) -> ModelPaths:
    """Turn `builtin:tiny`, `builtin:toy` (or their `-small`) or a checkpoint dir into paths."""
    if source.startswith("builtin:"):
        name = source.removeprefix("builtin:")
        base, _, suffix = name.partition("-")
        if base not in ("tiny", "toy") or suffix not in ("", "small"):
            raise ModelSourceError(
                f"unknown built-in model '{source}'; known: builtin:tiny, builtin:toy, "
                "builtin:tiny-small, builtin:toy-small"
            )
        paths = _builtin_paths(base)
        if suffix == "small":
            return ModelPaths(big=paths.small, adapters=paths.small_adapters)
        return paths
    path = Path(source).expanduser()
    if (path / "big" / "config.json").is_file():
        return _layout_paths(path)
    if not (path / "config.json").is_file():
        raise ModelSourceError(
            f"model source '{source}' is not a checkpoint directory (no config.json there); "
            "give a Hugging Face model directory or builtin:tiny / builtin:toy"
        )
    return ModelPaths(big=str(path))


def resolve_adapter(path: str, paths: ModelPaths | None = None) -> str:
    """An adapter path from the config: `builtin:<name>` looks it up in `paths`; else as is."""
    if not path.startswith("builtin:"):
        return path
    name = path.removeprefix("builtin:")
    known = paths.adapters if paths else {}
    if name not in known:
        raise ModelSourceError(
            f"built-in adapter '{name}' does not exist for this model; known: {', '.join(known) or 'none'}"
        )
    return known[name]


def _builtin_paths(base: str) -> ModelPaths:
    if base == "tiny":
        from models.builtin.tiny import ensure_tiny

        root = ensure_tiny()
    else:
        root = TOY_DIR
        if not (root / "big" / "config.json").is_file():
            raise ModelSourceError(
                f"builtin:toy is not built yet ({root} lacks big/config.json); train it with "
                "`python -m models.builtin.train --out models/builtin/weights/toy` or use builtin:tiny"
            )
    return _layout_paths(root)


def _layout_paths(root: Path) -> ModelPaths:
    """Paths of a directory laid out like the toy models (what models.builtin.train writes)."""
    return ModelPaths(
        big=str(root / "big"),
        small=str(root / "small"),
        adapters=_subdirs(root / "adapters"),
        small_adapters=_subdirs(root / "small_adapters"),
    )


def _subdirs(parent: Path) -> dict[str, str]:
    if not parent.is_dir():
        return {}
    return {
        p.name: str(p) for p in sorted(parent.iterdir()) if (p / "adapter_config.json").is_file()
    }
