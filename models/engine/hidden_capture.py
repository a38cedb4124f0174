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
    out: torch.Tensor  # [len(layers), captured tokens, hidden]
    index: torch.Tensor | None = None  # int64 [captured tokens]: which (prefill)

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


def row_prompt_positions(seq) -> int:
    """How many of the prompt's last tokens the row's prefill captures (at least 1)."""
    steering = seq.request.steering
    return max(1, steering.hidden_prompt_positions) if steering is not None else 1


@dataclass
class CapturePlan:
    """What one step captures: `layers`, and per row how many of its last new tokens
    (`counts`; None: one each, the token sampled from)."""

    layers: tuple[int, ...]
    counts: list[int] | None = None


class HiddenReader:
    """Plans a step's capture from its rows and hands each asking row its part.

    `plan(scheduled)`: the union of the rows' layers and, in a step that finishes a prompt,
    how many prompt tokens each row keeps (None when no row asks: the step runs without
    capture). `distribute(seqs, hidden, plan)` sets `seq.hidden` [row layers, hidden] (the
    position sampled from) and, at a prompt's end, `seq.prompt_hidden` [positions, row layers,
    hidden], on the model's device in its dtype, from the step's buffer.
    """

    def __init__(self, num_layers: int):
        self.num_layers = num_layers
        self._index: dict[tuple[tuple[int, ...], tuple[int, ...]], torch.Tensor] = {}
        self._pending: list = []  # (seq, step) recorded on the device since the last to_host

    def check(self, layers: list[int], what: str) -> None:
        """Raise ValueError naming `what` when a layer lies outside the model."""
        bad = [x for x in layers if not 0 <= x < self.num_layers]
        if bad:
            raise ValueError(f"{what}: layers {bad} outside [0, {self.num_layers})")

    @staticmethod
    def plan(scheduled: list) -> CapturePlan | None:
        if not any(item.seq.hidden_layers for item in scheduled):
            return None  # the usual step: one pass over the rows, nothing else
        layers: set[int] = set()
        counts, more = [], False
        for item in scheduled:
            seq = item.seq
            layers.update(seq.hidden_layers)
            k = 1
            ends_prompt = item.samples and seq.num_computed < seq.num_prompt_tokens
            if item.num_tokens > 1 and ends_prompt and seq.hidden_layers:
                k = min(seq.hidden_prompt_positions, item.num_tokens)
            counts.append(k)
            more = more or k > 1
        return CapturePlan(tuple(sorted(layers)), counts if more else None)

    def distribute(self, seqs: list, hidden: torch.Tensor | None, plan: CapturePlan | None) -> None:
        """hidden: [len(layers), captured tokens, hidden] of the step (rows in `seqs` order),
        maybe a view of a CUDA graph's static output: it is copied once before rows keep parts
        of it."""
        if hidden is None or plan is None:
            return
        hidden = hidden.clone()
        counts = plan.counts or [1] * len(seqs)
        end = 0
        for seq, k in zip(seqs, counts, strict=True):
            end += k
            want = seq.hidden_layers
            if not want:
                continue
            mine = hidden[:, end - k : end]
            if want != plan.layers:
                mine = mine[self._positions(want, plan.layers, hidden.device)]
            seq.hidden = mine[:, -1]
            if k > 1:
                seq.prompt_hidden = mine.transpose(0, 1)

    def record(self, seq, step: int) -> None:
        """Keep the state generated token `step` was sampled from for the client, when its
        request asked for layers (`GenerationRequest.hidden_layers`, in that order)."""
        asked = seq.request.hidden_layers
        if not asked or seq.hidden is None:
            return
        h = seq.hidden
        if list(seq.hidden_layers) != asked:  # a policy reads other layers too
            h = h[self._positions(tuple(asked), seq.hidden_layers, h.device)]
        seq.activations[step] = h
        self._pending.append((seq, step))

    def to_host(self) -> None:
        """Move the activations recorded since the last call to the host, compact, in one copy
        for all rows (before outputs are collected)."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        host = compact([seq.activations[step] for seq, step in pending],
                       pending[0][0].activations[pending[0][1]].dtype)  # fmt: skip
        for (seq, step), h in zip(pending, host, strict=True):
            seq.activations[step] = h

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
    flat = [h.reshape(-1, h.shape[-1]) for h in hiddens]
    host = torch.cat(flat).to("cpu", half)  # one copy for all rows
    parts = host.split([f.shape[0] for f in flat])
    return [part.view(h.shape) for part, h in zip(parts, hiddens, strict=True)]
