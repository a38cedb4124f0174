"""Activations for clients: `tandem.activations` in a request asks for the big model's residual
stream at chosen layers; each choice's tokens come back with theirs, base64 of little-endian
float16 bytes [layers, hidden_size] per token (None for a token a policy forced), in the
response's and the stream's `tandem.activations`. Bounded: at most MAX_LAYERS layers and
MAX_ACTIVATION_VECTORS vectors (layers x max_tokens x n) per request, else a 400."""

from __future__ import annotations

import base64
from typing import Any

from models.openai.errors import OpenAIError

MAX_LAYERS = 8
MAX_ACTIVATION_VECTORS = 8192  # 8192 x 2048 x 2 bytes = 32 MiB of raw vectors at most


def activation_layers(req: Any, max_tokens: int) -> list[int]:
    """The layers a request asks back (SamplingFields.tandem), checked: [] when none."""
    options = req.tandem.activations if req.tandem is not None else None
    if options is None:
        return []
    if options.probes:
        raise OpenAIError(
            "tandem.activations.probes is not supported yet; ask for raw vectors with layers",
            param="tandem.activations.probes",
        )
    vectors = len(options.layers) * max_tokens * req.n
    if vectors > MAX_ACTIVATION_VECTORS:
        raise OpenAIError(
            f"tandem.activations asks for {len(options.layers)} layers x {max_tokens} tokens x "
            f"n={req.n} = {vectors} vectors; at most {MAX_ACTIVATION_VECTORS} per request: ask "
            "for fewer layers or tokens",
            param="tandem.activations",
        )
    return list(options.layers)


def choice_activations(index: int, layers: list[int], hidden: list) -> dict[str, Any]:
    """One choice's activations object for these tokens' states (host tensors or None)."""
    shape = next((list(h.shape) for h in hidden if h is not None), [len(layers), 0])
    tokens = [
        None if h is None else base64.b64encode(h.half().numpy().tobytes()).decode()
        for h in hidden
    ]
    return {"index": index, "layers": layers, "dtype": "float16", "shape": shape,
            "tokens": tokens}  # fmt: skip


def all_activations(layers: list[int], choices: list) -> list[dict[str, Any]] | None:
    """The response's `tandem.activations`: one object per choice (None: none asked)."""
    if not layers:
        return None
    return [choice_activations(i, layers, c.hidden) for i, c in enumerate(choices)]
