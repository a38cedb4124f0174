"""Per-row LoRA inside the step: every resident adapter's low-rank weights stacked in slots.

For a linear layer with output parts (q|k|v, gate|up or one part), slot s and part p own
`rank` columns of A_cat [in, S*P*r] and the matching rows of B_cat [S*P*r, out] (B maps only
into part p's output columns; alpha/r scaling folded into B). For a batch with per-row slot
weights W [rows, S] (one-hot for a single adapter, the router's mix for top-k, zero = base):

    y = x @ W_base.T + ((x @ A_cat) * W[token_rows][:, slot of column]) @ B_cat

Static shapes and no per-row branching, so it is CUDA-graph friendly.
"""

from __future__ import annotations

import torch
from torch import nn

from models.engine.attention import ForwardBatch
from models.engine.kernels.linear import linear, linear_partials, lora_linear, silu_mul_linear
from models.engine.kernels.lora import RowLoRA


class LinearWithLoRA(nn.Module):
    """A linear layer (optionally fused from several HF projections) with stacked LoRA slots."""

    def __init__(self, in_features: int, part_sizes: list[int], bias: bool):
        super().__init__()
        self.in_features = in_features
        self.part_sizes = part_sizes
        self.weight = nn.Parameter(torch.empty(sum(part_sizes), in_features), requires_grad=False)
        self.bias = (
            nn.Parameter(torch.zeros(sum(part_sizes)), requires_grad=False) if bias else None
        )
        self.lora_a: torch.Tensor | None = None  # [in, S*P*r]
        self.lora_b: torch.Tensor | None = None  # [S*P*r, out]
        self.rank = 0

    def allocate_lora(self, num_slots: int, rank: int) -> None:
        """Make zeroed room for `num_slots` adapters of rank up to `rank`."""
        parts = len(self.part_sizes)
        cols = num_slots * parts * rank
        w = self.weight
        self.rank = rank
        self.lora_a = torch.zeros(self.in_features, cols, dtype=w.dtype, device=w.device)
        self.lora_b = torch.zeros(cols, w.shape[0], dtype=w.dtype, device=w.device)

    def free_lora(self) -> None:
        """Drop the LoRA room: the layer is a plain linear again."""
        self.lora_a = self.lora_b = None
        self.rank = 0

    def set_slot(
        self, slot: int, part: int, a: torch.Tensor | None, b: torch.Tensor | None, scale: float
    ) -> None:
        """Write one projection's LoRA (a [r, in], b [out_part, r], PEFT layout) into a slot;
        None clears it."""
        assert self.lora_a is not None and self.lora_b is not None
        parts, rank = len(self.part_sizes), self.rank
        col = (slot * parts + part) * rank
        out_start = sum(self.part_sizes[:part])
        out_end = out_start + self.part_sizes[part]
        self.lora_a[:, col : col + rank] = 0
        self.lora_b[col : col + rank, :] = 0
        if a is None or b is None:
            return
        r = a.shape[0]
        self.lora_a[:, col : col + r] = a.T.to(self.lora_a)
        self.lora_b[col : col + r, out_start:out_end] = (b.T * scale).to(self.lora_b)

    def clear_slot(self, slot: int) -> None:
        for part in range(len(self.part_sizes)):
            self.set_slot(slot, part, None, None, 1.0)

    def row_lora(self, batch: ForwardBatch) -> RowLoRA:
        """The slots with this step's per-row weights, for `lora_linear`."""
        return RowLoRA(
            self.lora_a, self.lora_b, batch.lora_weights, batch.token_rows, self.part_sizes,
            self.rank,
        )  # fmt: skip

    def forward_partials(self, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """forward(), or float32 split-K partial sums [S, tokens, out] when that is faster:
        only for an output that feeds a fused residual norm (which sums them)."""
        if self.lora_a is None or batch.lora_weights is None:
            return linear_partials(x, self.weight, self.bias)
        return lora_linear(x, self.weight, self.bias, self.row_lora(batch), partials=True)

    def forward(self, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        if self.lora_a is None or batch.lora_weights is None:
            return linear(x, self.weight, self.bias)
        return lora_linear(x, self.weight, self.bias, self.row_lora(batch))

    def forward_gated(self, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """silu(gate) * up for a [gate; up] layer without bias, [tokens, out / 2]; LoRA rows add
        into gate and up before the product. One kernel on CUDA where that is faster."""
        if self.lora_a is None or batch.lora_weights is None:
            return silu_mul_linear(x, self.weight)
        return lora_linear(x, self.weight, None, self.row_lora(batch), gated=True)
