"""Steering vectors for the big model: extraction, GGUF / safetensors files, a library on disk.

Layer numbering, one convention everywhere: `directions[l]` belongs to decoder block l (0-based)
and is added to that block's output, i.e. to `hidden_states[l + 1]` of a transformers forward
with `output_hidden_states=True` (`hidden_states[0]` is the embedding output). GGUF control
vectors use the same number: tensor `direction.{l}`. This is repeng's layout (its layer ids are
0-based block indices and it reads `hidden_states[l + 1]`) and llama.cpp's (its graph adds
`direction.{il}` after block `il` of its 0-based layer loop); llama.cpp never reads
`direction.0`, so a vector meant for llama.cpp should leave block 0 out.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

HiddenStatesFn = Callable[[list[str]], torch.Tensor]
"""texts -> float tensor [num_texts, num_blocks, hidden]: each block's output per text."""

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_METADATA_KEY = "tandem.metadata"


MAX_DIRECTION_NORM = 1e4
"""Largest L2 norm of one layer's direction a vector may have. Directions extracted from real
models sit around 1 to a few hundred (the toy model's: 28 to 107); 1e4 times the largest
coefficient a request may give (MAX_STEER_COEFF) still fits float16."""


class VectorShapeError(ValueError):
    """A steering vector does not fit the model it is meant for."""


class VectorValueError(ValueError):
    """A steering vector holds NaN or infinite values, or absurdly large ones."""


@dataclass
class SteeringVector:
    """Per-layer directions for one model: h_l <- h_l + coeff * directions[l].

    directions: block index (0-based, see the module docstring) -> float32 tensor [hidden].
    model_hint: the model family or checkpoint it was made for (GGUF `controlvector.model_hint`).
    """

    name: str
    directions: dict[int, torch.Tensor]
    model_hint: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.directions:
            raise VectorShapeError(f"steering vector '{self.name}' has no directions")
        self.directions = {
            int(layer): torch.as_tensor(d, dtype=torch.float32).detach().cpu().reshape(-1)
            for layer, d in sorted(self.directions.items())
        }
        sizes = {d.numel() for d in self.directions.values()}
        if len(sizes) != 1:
            raise VectorShapeError(
                f"steering vector '{self.name}' mixes hidden sizes {sorted(sizes)} across layers"
            )
        for layer, d in self.directions.items():
            check_direction(self.name, layer, d)

    @property
    def hidden_size(self) -> int:
        return next(iter(self.directions.values())).numel()

    @property
    def layers(self) -> list[int]:
        return list(self.directions)

    def check_fits(self, num_layers: int, hidden_size: int) -> None:
        """Raise VectorShapeError naming both shapes when this vector cannot steer such a model."""
        top = max(self.directions)
        if self.hidden_size != hidden_size or top >= num_layers or min(self.directions) < 0:
            raise VectorShapeError(
                f"steering vector '{self.name}' has hidden size {self.hidden_size} on layers "
                f"{min(self.directions)}..{top}, but the model has hidden size {hidden_size} and "
                f"{num_layers} layers (0..{num_layers - 1})"
            )

    def as_tensor(self, num_layers: int) -> torch.Tensor:
        """float32 [num_layers, hidden]: one row per block, zeros where the vector has none."""
        self.check_fits(num_layers, self.hidden_size)
        out = torch.zeros(num_layers, self.hidden_size, dtype=torch.float32)
        for layer, d in self.directions.items():
            out[layer] = d
        return out

    def apply(self, hidden: torch.Tensor, layer: int, coeff: float) -> torch.Tensor:
        """hidden [..., hidden_size] + coeff * directions[layer] (unchanged if the layer has none)."""
        d = self.directions.get(layer)
        if d is None:
            return hidden
        return hidden + coeff * d.to(device=hidden.device, dtype=hidden.dtype)


def check_direction(name: str, layer: int, direction: torch.Tensor) -> None:
    """Raise VectorValueError unless `direction` is finite with norm <= MAX_DIRECTION_NORM
    (a poisoned vector would turn every steered row's output into garbage)."""
    if not bool(torch.isfinite(direction).all()):
        raise VectorValueError(
            f"steering vector '{name}': layer {layer} holds NaN or infinite values"
        )
    norm = float(direction.double().norm())
    if norm > MAX_DIRECTION_NORM:
        raise VectorValueError(
            f"steering vector '{name}': layer {layer} has norm {norm:.3g}; at most "
            f"{MAX_DIRECTION_NORM:g} is accepted"
        )


@contextmanager
def steered_transformers(
    model: Any, vector: SteeringVector, coeff: float, layers: Sequence[int] | None = None
) -> Iterator[None]:
    """Within the block, a transformers Llama-family model adds coeff * directions[l] to the
    output of each decoder block l (`layers` limits which): the engine's steering, for models
    the engine does not run and for reference checks."""
    blocks = _decoder_blocks(model)
    vector.check_fits(len(blocks), vector.hidden_size)
    chosen = [layer for layer in vector.layers if layers is None or layer in layers]

    def hook(layer: int):
        def add(_module, _inputs, output):
            if isinstance(output, tuple):
                return (vector.apply(output[0], layer, coeff), *output[1:])
            return vector.apply(output, layer, coeff)

        return add

    handles = [blocks[layer].register_forward_hook(hook(layer)) for layer in chosen]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _decoder_blocks(model: Any) -> Any:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.model.layers


# ---- extraction ------------------------------------------------------------------------------


def transformers_hidden_states(
    model: Any, tokenizer: Any, pool: Literal["last", "mean"] = "last"
) -> HiddenStatesFn:
    """A HiddenStatesFn over a transformers causal LM: each block's output at the last token
    ("last", repeng's choice: the state the next token is generated from) or averaged over the
    text's tokens ("mean"). Texts run one at a time, so no padding touches the result."""

    @torch.no_grad()
    def hidden_states(texts: list[str]) -> torch.Tensor:
        device = next(model.parameters()).device
        rows = []
        for text in texts:
            ids = tokenizer(text, return_tensors="pt").input_ids.to(device)
            out = model(input_ids=ids, output_hidden_states=True)
            per_block = torch.stack(out.hidden_states[1:], dim=0)[:, 0]  # [blocks, seq, hidden]
            pooled = per_block[:, -1] if pool == "last" else per_block.mean(dim=1)
            rows.append(pooled.float().cpu())
        return torch.stack(rows)

    return hidden_states


def default_layers(num_layers: int) -> list[int]:
    """The middle half of the blocks, where steering works best (repeng, CAA)."""
    start = num_layers // 4
    return list(range(start, max(start + 1, num_layers - num_layers // 4)))


def extract_vector(
    name: str,
    hidden_states: HiddenStatesFn,
    positive: Sequence[str],
    negative: Sequence[str],
    layers: Sequence[int] | None = None,
    method: Literal["mean", "pca"] = "mean",
    model_hint: str = "",
) -> SteeringVector:
    """Extract a steering vector from contrastive pairs (positive[i] vs negative[i]).

    mean: the mean of the differences, per layer. pca: the first principal direction of the
    differences (uncentred: they are already relative to their pair), sign aligned with the mean
    difference and scaled by the differences' mean projection on it, so coeff 1 means about one
    average contrast for both methods.
    """
    if len(positive) != len(negative) or not positive:
        raise ValueError(
            f"vector '{name}' needs matching non-empty pairs; got {len(positive)} positive and "
            f"{len(negative)} negative prompts"
        )
    pos = hidden_states(list(positive))
    neg = hidden_states(list(negative))
    num_layers = pos.shape[1]
    chosen = list(layers) if layers is not None else default_layers(num_layers)
    bad = [layer for layer in chosen if not 0 <= layer < num_layers]
    if bad:
        raise VectorShapeError(f"vector '{name}': layers {bad} outside 0..{num_layers - 1}")
    directions = {}
    for layer in chosen:
        diffs = (pos[:, layer] - neg[:, layer]).double()
        directions[layer] = _direction(diffs, method).float()
    return SteeringVector(
        name,
        directions,
        model_hint=model_hint,
        metadata={"method": method, "pairs": len(positive)},
    )


def _direction(diffs: torch.Tensor, method: str) -> torch.Tensor:
    mean = diffs.mean(dim=0)
    if method == "mean":
        return mean
    if method != "pca":
        raise ValueError(f"unknown extraction method '{method}' (mean, pca)")
    _, _, vh = torch.linalg.svd(diffs, full_matrices=False)
    first = vh[0]
    if torch.dot(first, mean) < 0:
        first = -first
    return first * (diffs @ first).mean()


# ---- files -----------------------------------------------------------------------------------


def save_gguf(vector: SteeringVector, path: str | Path) -> None:
    """Write a llama.cpp / repeng control vector: general.architecture = controlvector,
    controlvector.model_hint, controlvector.layer_count, one float32 `direction.{l}` per layer."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "controlvector")
    writer.add_string("controlvector.model_hint", vector.model_hint)
    writer.add_uint32("controlvector.layer_count", len(vector.directions))
    writer.add_string(_METADATA_KEY, json.dumps({"name": vector.name, **vector.metadata}))
    for layer, d in vector.directions.items():
        writer.add_tensor(f"direction.{layer}", d.numpy().astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def load_gguf(path: str | Path, name: str | None = None) -> SteeringVector:
    """Read a GGUF control vector (ours, repeng's or llama.cpp's)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    fields = {f.name: f for f in reader.fields.values()}
    arch = _gguf_str(fields.get("general.architecture"))
    if arch != "controlvector":
        raise ValueError(f"{path} is not a control vector (general.architecture = {arch!r})")
    meta = json.loads(_gguf_str(fields.get(_METADATA_KEY)) or "{}")
    directions = {}
    for tensor in reader.tensors:
        match = re.fullmatch(r"direction\.(\d+)", tensor.name)
        if match:
            directions[int(match.group(1))] = torch.from_numpy(np.array(tensor.data, np.float32))
    stored_name = meta.pop("name", None)
    return SteeringVector(
        name or stored_name or Path(path).stem,
        directions,
        model_hint=_gguf_str(fields.get("controlvector.model_hint")) or "",
        metadata=meta,
    )


def _gguf_str(f: Any) -> str | None:
    if f is None:
        return None
    return bytes(f.parts[f.data[0]]).decode("utf-8")


def save_safetensors(vector: SteeringVector, path: str | Path) -> None:
    """Write the directions as `direction.{l}` tensors; name, hint and metadata in the header."""
    from safetensors.torch import save_file

    tensors = {f"direction.{layer}": d.contiguous() for layer, d in vector.directions.items()}
    header = {"name": vector.name, "model_hint": vector.model_hint}
    header[_METADATA_KEY] = json.dumps(vector.metadata)
    save_file(tensors, str(path), metadata=header)


def load_safetensors(path: str | Path, name: str | None = None) -> SteeringVector:
    from safetensors import safe_open

    directions = {}
    with safe_open(str(path), framework="pt") as f:
        header = f.metadata() or {}
        for key in f.keys():
            match = re.fullmatch(r"direction\.(\d+)", key)
            if match:
                directions[int(match.group(1))] = f.get_tensor(key)
    return SteeringVector(
        name or header.get("name") or Path(path).stem,
        directions,
        model_hint=header.get("model_hint", ""),
        metadata=json.loads(header.get(_METADATA_KEY, "{}")),
    )


def load_vector(path: str | Path, name: str | None = None) -> SteeringVector:
    """Load a .gguf or .safetensors steering vector."""
    suffix = Path(path).suffix
    if suffix == ".gguf":
        return load_gguf(path, name)
    if suffix == ".safetensors":
        return load_safetensors(path, name)
    raise ValueError(f"{path}: steering vectors are .gguf or .safetensors files")


def save_vector(vector: SteeringVector, path: str | Path) -> None:
    """Save as .gguf or .safetensors, by the path's suffix."""
    suffix = Path(path).suffix
    if suffix == ".gguf":
        save_gguf(vector, path)
    elif suffix == ".safetensors":
        save_safetensors(vector, path)
    else:
        raise ValueError(f"{path}: steering vectors are .gguf or .safetensors files")


# ---- the library -----------------------------------------------------------------------------


class VectorLibrary:
    """A directory of steering vectors, one `<name>.gguf` each, checked against one model shape.

    num_layers / hidden_size: the big model's shape; when given, `add` and `get` refuse vectors
    that do not fit it.
    """

    def __init__(
        self, root: str | Path, num_layers: int | None = None, hidden_size: int | None = None
    ):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.num_layers = num_layers
        self.hidden_size = hidden_size

    def list(self) -> list[str]:
        names = {p.stem for p in self.root.glob("*.gguf")}
        names |= {p.stem for p in self.root.glob("*.safetensors")}
        return sorted(names)

    def __contains__(self, name: str) -> bool:
        return self._path(name) is not None

    def get(self, name: str) -> SteeringVector:
        path = self._path(name)
        if path is None:
            raise KeyError(f"steering vector '{name}' not found; known: {', '.join(self.list())}")
        vector = load_vector(path, name)
        self._check(vector)
        return vector

    def add(self, vector: SteeringVector, overwrite: bool = True) -> Path:
        """Validate and persist `vector` as <root>/<name>.gguf."""
        if not _NAME_RE.match(vector.name):
            raise ValueError(
                f"invalid steering vector name {vector.name!r}: letters, digits, '_', '.', '-'"
            )
        if not overwrite and vector.name in self:
            raise FileExistsError(f"steering vector '{vector.name}' already exists")
        self._check(vector)
        self.remove(vector.name, missing_ok=True)
        path = self.root / f"{vector.name}.gguf"
        tmp = path.with_suffix(".gguf.tmp")
        save_gguf(vector, tmp)
        tmp.replace(path)
        return path

    def remove(self, name: str, missing_ok: bool = False) -> None:
        path = self._path(name)
        if path is None:
            if missing_ok:
                return
            raise KeyError(f"steering vector '{name}' not found; known: {', '.join(self.list())}")
        path.unlink()

    def _path(self, name: str) -> Path | None:
        if not _NAME_RE.match(name):
            return None
        for suffix in (".gguf", ".safetensors"):
            path = self.root / f"{name}{suffix}"
            if path.exists():
                return path
        return None

    def _check(self, vector: SteeringVector) -> None:
        if self.num_layers is not None and self.hidden_size is not None:
            vector.check_fits(self.num_layers, self.hidden_size)


def ensure_default_vectors(
    config: Any, model_path: str, library: VectorLibrary, model: Any = None, tokenizer: Any = None
) -> list[str]:
    """Make every vector of the steering config available in `library`: copy the ones given
    as files, extract the ones given as pairs on the big model at `model_path` (once; later
    starts find them cached, unless the config's spec of the vector changed since). Returns the
    names now available. `config` is a SteeringConfig."""
    names = []
    for spec in config.vectors:
        names.append(spec.name)
        fingerprint = hashlib.sha256(spec.model_dump_json().encode()).hexdigest()[:16]
        if spec.name in library and library.get(spec.name).metadata.get("spec") == fingerprint:
            continue
        if spec.path:
            vector = load_vector(spec.path, spec.name)
            vector.metadata["spec"] = fingerprint
            library.add(vector)
            continue
        if model is None:
            model, tokenizer = load_transformers_model(model_path)
        vector = extract_vector(
            spec.name,
            transformers_hidden_states(model, tokenizer, pool=spec.pool),
            spec.positive,
            spec.negative,
            layers=spec.layers,
            method=spec.method,
            model_hint=getattr(model.config, "model_type", ""),
        )
        vector.metadata.update(pool=spec.pool, spec=fingerprint)
        library.add(vector)
    return names


def load_transformers_model(model_path: str) -> tuple[Any, Any]:
    """(model, tokenizer) of a checkpoint through transformers, float32, for extraction."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    return model, tokenizer
