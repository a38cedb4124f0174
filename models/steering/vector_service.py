"""The steering vectors one Generator replica serves: its library on disk, uploads, extraction.

`VectorService` owns the replica's `VectorLibrary` (the configured vectors are extracted or
loaded at start), validates uploaded GGUF/safetensors files, extracts new vectors from
contrastive prompt pairs on the big model, and registers with the engine every vector it
does not have yet.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

from models.protocol.engine import Engine
from models.protocol.errors import TandemError
from models.steering.config import SteeringConfig
from models.steering.sae import SAE_PREFIX, load_configured_sae, sae_feature, sae_steering_tensor
from models.steering.vectors import (
    SteeringVector,
    VectorLibrary,
    ensure_default_vectors,
    extract_vector,
    load_transformers_model,
    load_vector,
    save_gguf,
    transformers_hidden_states,
)

log = logging.getLogger(__name__)


class VectorUploadError(TandemError):
    """A steering vector upload or extraction that cannot be used (bad file, wrong shape)."""

    code = "invalid_steering_vector"


class VectorFileTypeError(VectorUploadError):
    """An uploaded steering vector that is neither GGUF nor safetensors."""

    status_code = 415


class VectorService:
    """The vector library of the big model at `big_model_path`, kept in step with an engine."""

    def __init__(self, config: SteeringConfig, big_model_path: str):
        from models.steering.runtime import default_vector_dir

        self.big_model_path = big_model_path
        shape = json.loads((Path(big_model_path) / "config.json").read_text())
        root = config.vector_dir or default_vector_dir(big_model_path)
        self.library = VectorLibrary(root, shape["num_hidden_layers"], shape["hidden_size"])
        ensure_default_vectors(config, big_model_path, self.library)
        self.sae = load_configured_sae(config.sae, big_model_path, shape["hidden_size"],
                                       shape["num_hidden_layers"])  # fmt: skip
        self._sae_wanted = {SAE_PREFIX + n for n in self.sae.names} if self.sae else set()
        self._registered: set[str] = set()

    def names(self) -> list[str]:
        return self.library.list() + sorted(SAE_PREFIX + n for n in getattr(self.sae, "names", {}))

    def sync(self, engine: Engine) -> None:
        """Register with the engine every library vector it does not have yet (one that no
        longer loads, e.g. a NaN file an older version accepted, is left out and logged)."""
        for name in self.library.list():
            if name not in self._registered and (vector := self._get(name)) is not None:
                engine.register_vector(name, vector.as_tensor(self.library.num_layers))
                self._registered.add(name)
        for name in self._sae_wanted - self._registered:  # SAE features: `sae:<name|index>`
            index = sae_feature(self.sae, name)
            engine.register_vector(name, sae_steering_tensor(self.sae, index, self.library.num_layers))
            self._registered.add(name)

    def _get(self, name: str) -> SteeringVector | None:
        try:
            return self.library.get(name)
        except (ValueError, OSError) as exc:
            log.warning("steering vector '%s' in %s is left out: %s", name, self.library.root,
                        exc)  # fmt: skip
            return None

    def registered(self, names: list[str]) -> bool:
        """Whether the engine already has every one of these vectors (an SAE feature not yet
        registered is noted: the next sync registers it)."""
        self._sae_wanted |= {n for n in names if sae_feature(self.sae, n) is not None}
        return all(name in self._registered for name in names)

    def describe(self, name: str | None = None) -> list[dict[str, Any]]:
        """The vectors (or the one named) as OpenAI-list style objects."""
        out = []
        for vector_name in [name] if name else self.names():
            if (index := sae_feature(self.sae, vector_name)) is not None:
                out.append({"id": vector_name, "object": "steering.vector", "name": vector_name,
                            "layers": [self.sae.layer], "hidden_size": self.sae.d_model,
                            "model_hint": "sae", "metadata": {"sae_feature": index}})
                continue
            if (v := self._get(vector_name)) is None:
                continue
            out.append({"id": vector_name, "object": "steering.vector", "name": vector_name,
                        "layers": v.layers, "hidden_size": v.hidden_size,
                        "model_hint": v.model_hint, "metadata": v.metadata})
        return out

    def add_upload(self, name: str, data: bytes, filename: str) -> None:
        """Validate and store an uploaded GGUF or safetensors vector (registered on next sync)."""
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
            self.library.add(vector)
        except ValueError as exc:
            raise VectorUploadError(str(exc)) from None
        self._registered.discard(name)

    def remove(self, name: str) -> None:
        """Delete a vector from the library (and so from the list requests are checked
        against); the engine keeps its copy until the name is registered again."""
        if name.startswith(SAE_PREFIX):
            raise VectorUploadError(f"'{name}' is a feature of the configured SAE "
                                    "(steering.sae); it cannot be deleted")  # fmt: skip
        self.library.remove(name, missing_ok=True)  # replicas sharing the directory
        self._registered.discard(name)

    def extract_gguf(self, name: str, positive: list[str], negative: list[str],
                     layers: list[int] | None, method: str) -> bytes:
        """Extract a vector from contrastive pairs on the big model (blocking: seconds);
        returns it as GGUF bytes."""
        try:
            model, tokenizer = load_transformers_model(self.big_model_path)
            vector = extract_vector(name, transformers_hidden_states(model, tokenizer), positive,
                                    negative, layers=layers, method=method,
                                    model_hint=getattr(model.config, "model_type", ""))
        except ValueError as exc:
            raise VectorUploadError(str(exc)) from None
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "v.gguf"
            save_gguf(vector, path)
            return path.read_bytes()
