"""Steering vectors for the engines over other packages: the request's checks and its per-layer
deltas (h_l += c * v_l after layer l, summed over the request's vectors), the torch engine's
rule (models.engine.llm_engine), for the vLLM hooks and exllamav2's per-module forward."""

from __future__ import annotations

import torch

from models.protocol.errors import EngineError, VectorNotFoundError
from models.protocol.requests import GenerationRequest


def check_vectors(request: GenerationRequest, vectors: dict[str, torch.Tensor],
                  num_layers: int) -> None:  # fmt: skip
    """A 400 (404 for an unknown name) for a steering vector the engine cannot apply."""
    for spec in request.steer_vectors:
        if spec.name not in vectors:
            raise VectorNotFoundError.naming(spec.name, vectors, "steering.vectors")
        bad = [x for x in spec.layers or [] if not 0 <= x < num_layers]
        if bad:
            raise EngineError(f"steering vector '{spec.name}': layers {bad} outside "
                              f"[0, {num_layers})", "steering.vectors")  # fmt: skip


def vector_deltas(request: GenerationRequest,
                  vectors: dict[str, torch.Tensor]) -> dict[int, torch.Tensor]:  # fmt: skip
    """layer -> the sum of c * v_l (float32) over the request's steering vectors."""
    out: dict[int, torch.Tensor] = {}
    for spec in request.steer_vectors:
        vector = vectors[spec.name]
        for layer in spec.layers if spec.layers is not None else range(vector.shape[0]):
            delta = spec.coeff * vector[layer].to(torch.float32)
            out[layer] = out[layer] + delta if layer in out else delta
    return out
