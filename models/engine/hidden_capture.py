"""The read side of the step: the big model's residual stream at chosen layers, per row.

A row asks for layers through its request (`GenerationRequest.hidden_layers`, activations for
clients) or its steering policy (`SteeringRequest.hidden_layers`, read by policies as
`ForwardPass.hidden`). Layer l means the residual stream after block l, steering included:
`hidden_states[l + 1]` of a transformers forward, where steering vectors are added too.

A step in which some row asks copies the union of the asked layers into one buffer
[layers, rows, hidden] inside the forward (`LayerCapture`: one copy per layer for the whole
batch, captured in the decode CUDA graph like any other kernel, no host sync); a step in which
no row asks runs exactly as before. Rows then get views (or one gather) of that buffer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LayerCapture:
    """Where a forward copies the residual stream: `out[k]` gets layer `layers[k]` at the
    tokens `index` (None: every token, as in a decode step's one token per row)."""

    layers: tuple[int, ...]
    out: torch.Tensor  # [len(layers), rows, hidden]
    index: torch.Tensor | None = None  # int64 [rows]: token of each row (prefill)

    def writer(self, layer: int):
        """A function copying the completed residual stream [tokens, hidden] of `layer` into
        its slot, or None when `layer` is not captured."""
        if layer not in self.layers:
            return None
        slot = self.out[self.layers.index(layer)]
        index = self.index

        def write(residual: torch.Tensor) -> None:
            slot.copy_(residual if index is None else residual.index_select(0, index))

        return write


def row_layers(seq) -> tuple[int, ...]:
    """The layers a sequence asks for, its request's and its steering policy's, sorted."""
    request = seq.request
    layers = set(request.hidden_layers)
    if request.steering is not None:
        layers.update(request.steering.hidden_layers)
    return tuple(sorted(layers))


class HiddenReader:
    """Picks a step's capture layers from its rows and hands each asking row its part.

    `step_layers(seqs)` is the union of the rows' layers (None when no row asks: the step runs
    without capture); `distribute(seqs, hidden, layers)` sets `seq.hidden` [row layers, hidden]
    (on the model's device, in its dtype) for every asking row, from the step's buffer.
    """

    def __init__(self, num_layers: int):
        self.num_layers = num_layers
        self._index: dict[tuple[tuple[int, ...], tuple[int, ...]], torch.Tensor] = {}

    def check(self, layers: list[int], what: str) -> None:
        """Raise ValueError naming `what` when a layer lies outside the model."""
        bad = [x for x in layers if not 0 <= x < self.num_layers]
        if bad:
            raise ValueError(f"{what}: layers {bad} outside [0, {self.num_layers})")

    @staticmethod
    def step_layers(seqs: list) -> tuple[int, ...] | None:
        layers: set[int] = set()
        for seq in seqs:
            layers.update(seq.hidden_layers)
        return tuple(sorted(layers)) or None

    def distribute(
        self, seqs: list, hidden: torch.Tensor | None, layers: tuple[int, ...] | None
    ) -> None:
        """hidden: [len(layers), rows, hidden] of the step (rows in `seqs` order), maybe a view
        of a CUDA graph's static output: it is copied once before rows keep parts of it."""
        if hidden is None or layers is None:
            return
        hidden = hidden.clone()
        for row, seq in enumerate(seqs):
            want = seq.hidden_layers
            if not want:
                continue
            if want == layers:
                seq.hidden = hidden[:, row]
            else:
                seq.hidden = hidden[self._positions(want, layers, hidden.device), row]

    def _positions(
        self, want: tuple[int, ...], have: tuple[int, ...], device: torch.device
    ) -> torch.Tensor:
        """Indices of `want` in `have` on the device, cached (no host->device copy per row)."""
        key = (want, have)
        index = self._index.get(key)
        if index is None:
            index = torch.tensor([have.index(x) for x in want], device=device)
            self._index[key] = index
        return index


def compact(hiddens: list[torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
    """Rows' hidden states for a consumer in another process: one stacked copy to the host in
    a half-precision dtype (bfloat16 models stay bfloat16, others go float16), split again."""
    if not hiddens:
        return []
    half = dtype if dtype in (torch.float16, torch.bfloat16) else torch.float16
    host = torch.cat(hiddens).to("cpu", half)  # rows are [layers_i, hidden]: one copy for all
    return list(host.split([h.shape[0] for h in hiddens]))
