"""Where a LoRA adapter may be loaded from, and what a PEFT adapter directory holds.

`resolve_adapter_path` confines paths that clients send (POST /v1/load_lora_adapter) to the
configured `router.adapter_roots`; `inspect_adapter_dir` checks a PEFT directory before an
engine spends time loading it. Errors are `EngineError`s with `status_code` and `code`, so the
HTTP layer turns them into OpenAI errors: 404 for a missing directory, 400 for the rest.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from models.protocol.errors import EngineError

SAFETENSORS_FILE = "adapter_model.safetensors"
TORCH_BIN_FILE = "adapter_model.bin"
CONFIG_FILE = "adapter_config.json"


class AdapterPathError(EngineError):
    """An adapter path or directory that cannot be used."""

    status_code = 400
    code = "invalid_adapter_path"


class AdapterPathNotAllowedError(AdapterPathError):
    """The path leaves the adapter roots (`..`, a symlink out, an absolute path elsewhere)."""

    code = "adapter_path_not_allowed"


class AdapterDirNotFoundError(AdapterPathError):
    """No adapter directory at that path."""

    status_code = 404
    code = "adapter_not_found"


class AdapterConfigError(AdapterPathError):
    """adapter_config.json is missing, unreadable or lacks what a LoRA needs."""

    code = "invalid_adapter_config"


class AdapterWeightsError(AdapterPathError):
    """The weights file is missing, corrupt, or holds no LoRA tensors."""

    code = "invalid_adapter_weights"


class AdapterUnfitError(AdapterPathError):
    """A valid adapter this server cannot use (not LoRA, rank too large, shapes off)."""

    code = "adapter_unfit"


@dataclass
class AdapterInfo:
    """What a PEFT LoRA directory declares and holds."""

    path: str
    rank: int
    lora_alpha: float
    target_modules: list[str] | str | None  # PEFT allows a list of names or one regex
    base_model_name_or_path: str | None
    weights_file: str
    num_tensors: int


def _inside(path: Path, root: Path) -> bool:
    return path == root or path.is_relative_to(root)


def resolve_adapter_path(path: str, roots: list[str]) -> Path:
    """The real directory `path` names, refusing anything outside `roots`.

    A relative path is looked up under each root in turn and must stay inside that root after
    `..` and symlinks are resolved; an absolute path must resolve inside one of the roots.
    Returns the resolved path (symlinks followed), so later loads read what was checked.
    """
    if not roots:
        raise AdapterPathNotAllowedError(
            "loading adapters by path is disabled: router.adapter_roots is empty"
        )
    if not path or "\x00" in path:
        raise AdapterPathError("adapter path must be a non-empty path")
    real_roots = [Path(r).expanduser().resolve() for r in roots]  # config may say ~/adapters
    given = Path(path)
    if given.is_absolute():
        options = [(given.resolve(), real_roots)]
    else:
        options = [((root / given).resolve(), [root]) for root in real_roots]
    allowed = [real for real, within in options if any(_inside(real, r) for r in within)]
    if len(allowed) < len(options):
        raise AdapterPathNotAllowedError(
            f"adapter path '{path}' leads outside the allowed adapter roots"
        )
    for real in allowed:
        if real.is_dir():
            return real
        if real.exists():
            raise AdapterPathError(f"adapter path '{path}' is not a directory")
    raise AdapterDirNotFoundError(f"no adapter directory '{path}' under the adapter roots")


def inspect_adapter_dir(path: str | Path, max_rank: int | None = None) -> AdapterInfo:
    """Read and check a PEFT LoRA directory: config fields, weights readable, ranks consistent.

    `max_rank`: refuse adapters whose rank exceeds what the engine was sized for.
    """
    directory = Path(path)
    if not directory.exists():
        raise AdapterDirNotFoundError(f"adapter directory '{path}' does not exist")
    if not directory.is_dir():
        raise AdapterPathError(f"adapter path '{path}' is not a directory")
    config = _read_config(directory)
    rank, alpha = _rank_and_alpha(config)
    ranks = [rank, *config.get("rank_pattern", {}).values()]
    if max_rank is not None and max(ranks) > max_rank:
        raise AdapterUnfitError(
            f"adapter '{path}' has LoRA rank {max(ranks)}; this server accepts at most {max_rank}"
        )
    weights_file, shapes = _read_weight_shapes(directory)
    if not config.get("rank_pattern"):
        _check_ranks(shapes, rank, path)
    return AdapterInfo(
        path=str(directory),
        rank=rank,
        lora_alpha=alpha,
        target_modules=config.get("target_modules"),
        base_model_name_or_path=config.get("base_model_name_or_path"),
        weights_file=str(weights_file),
        num_tensors=len(shapes),
    )


def _read_config(directory: Path) -> dict:
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise AdapterConfigError(f"'{directory}' has no {CONFIG_FILE}: not a PEFT adapter")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterConfigError(
            f"{CONFIG_FILE} in '{directory}' is not valid JSON: {exc}"
        ) from None
    if not isinstance(config, dict):
        raise AdapterConfigError(f"{CONFIG_FILE} in '{directory}' is not a JSON object")
    peft_type = config.get("peft_type", "LORA")
    if str(peft_type).upper() != "LORA":
        raise AdapterUnfitError(f"adapter '{directory}' is {peft_type}, only LoRA is supported")
    return config


def _rank_and_alpha(config: dict) -> tuple[int, float]:
    rank, alpha = config.get("r"), config.get("lora_alpha", 8)
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise AdapterConfigError(f"{CONFIG_FILE}: 'r' must be a positive integer, got {rank!r}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise AdapterConfigError(f"{CONFIG_FILE}: 'lora_alpha' must be a number, got {alpha!r}")
    return rank, float(alpha)


def _read_weight_shapes(directory: Path) -> tuple[Path, dict[str, tuple[int, ...]]]:
    """The weights file and the shape of every tensor in it (safetensors preferred)."""
    safetensors_path, bin_path = directory / SAFETENSORS_FILE, directory / TORCH_BIN_FILE
    if safetensors_path.is_file():
        shapes = _safetensors_shapes(safetensors_path)
        weights = safetensors_path
    elif bin_path.is_file():
        shapes = _torch_bin_shapes(bin_path)
        weights = bin_path
    else:
        raise AdapterWeightsError(f"'{directory}' has no {SAFETENSORS_FILE} or {TORCH_BIN_FILE}")
    if not any("lora_" in name for name in shapes):
        raise AdapterWeightsError(f"{weights.name} in '{directory}' holds no LoRA tensors")
    return weights, shapes


def _safetensors_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own and OS errors for damaged files
        raise AdapterWeightsError(f"cannot read {file.name} in '{file.parent}': {exc}") from None


def _torch_bin_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    import torch

    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and OS errors all mean the file is unusable
        raise AdapterWeightsError(f"cannot read {file.name} in '{file.parent}': {exc}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise AdapterWeightsError(f"{file.name} in '{file.parent}' is not a tensor state dict")
    return {k: tuple(v.shape) for k, v in state.items()}


def _check_ranks(shapes: dict[str, tuple[int, ...]], rank: int, path: str | Path) -> None:
    for name, shape in shapes.items():
        if "lora_A" in name and shape and shape[0] != rank:
            raise AdapterUnfitError(
                f"adapter '{path}': tensor {name} has rank {shape[0]} but r = {rank}"
            )
