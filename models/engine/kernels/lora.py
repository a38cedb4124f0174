"""Per-row multi-LoRA added into a linear layer's output (`lora_add_`): the Triton kernel, its
torch reference, and `RowLoRA`, the arguments a layer hands to it or to `lora_linear`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from models.engine.kernels.launch import HAS_TRITON, pdl_options, tl, triton, use_triton


def lora_add_ref(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    row_weights: torch.Tensor,
    token_rows: torch.Tensor,
    num_parts: int,
    rank: int,
) -> torch.Tensor:
    """y += ((x @ lora_a) * per-column slot weight of the token's row) @ lora_b (torch)."""
    num_slots = row_weights.shape[1]
    column_slot = torch.arange(num_slots, device=x.device).repeat_interleave(num_parts * rank)
    mask = row_weights.index_select(0, token_rows)[:, column_slot].to(x.dtype)
    return y.add_(((x @ lora_a) * mask) @ lora_b)


if HAS_TRITON:
    from models.engine.kernels.launch import pdl_start

    @triton.jit
    def _lora_add_kernel(
        y_ptr,
        x_ptr,
        a_ptr,
        b_ptr,
        w_ptr,
        rows_ptr,
        stride_y,
        stride_x,
        stride_a,
        stride_b,
        stride_w,
        k_dim,
        num_slots,
        rank,
        num_parts,
        end0,
        end1,
        end2,
        n_split,
        R_PAD: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_OUT: tl.constexpr,
        USE_PDL: tl.constexpr,
    ):
        pdl_start(USE_PDL)
        t = tl.program_id(0).to(tl.int64)
        part = tl.program_id(1)
        split = tl.program_id(2)
        lo = tl.where(part == 0, 0, tl.where(part == 1, end0, end1))
        hi = tl.where(part == 0, end0, tl.where(part == 1, end1, end2))
        chunk = tl.cdiv(tl.cdiv(hi - lo, n_split), BLOCK_OUT) * BLOCK_OUT
        c_lo = lo + split * chunk
        c_hi = tl.minimum(c_lo + chunk, hi)
        row = tl.load(rows_ptr + t)
        j = tl.arange(0, R_PAD)
        jmask = j < rank
        kk = tl.arange(0, BLOCK_K)
        cc = tl.arange(0, BLOCK_OUT)
        for slot in range(num_slots):
            w = tl.load(w_ptr + row * stride_w + slot).to(tl.float32)
            if w != 0.0:
                col0 = (slot * num_parts + part) * rank
                s = tl.zeros([R_PAD], tl.float32)
                for k0 in range(0, k_dim, BLOCK_K):
                    k = k0 + kk
                    kmask = k < k_dim
                    xv = tl.load(x_ptr + t * stride_x + k, mask=kmask, other=0.0)
                    a = tl.load(
                        a_ptr + k[:, None] * stride_a + (col0 + j)[None, :],
                        mask=kmask[:, None] & jmask[None, :],
                        other=0.0,
                    )
                    s += tl.sum(xv.to(tl.float32)[:, None] * a.to(tl.float32), 0)
                s = s * w
                for c0 in range(c_lo, c_hi, BLOCK_OUT):
                    c = c0 + cc
                    cmask = c < c_hi
                    b = tl.load(
                        b_ptr + (col0 + j)[:, None] * stride_b + c[None, :],
                        mask=jmask[:, None] & cmask[None, :],
                        other=0.0,
                    )
                    delta = tl.sum(s[:, None] * b.to(tl.float32), 0)
                    yp = y_ptr + t * stride_y + c
                    y = tl.load(yp, mask=cmask, other=0.0)
                    tl.store(yp, (y.to(tl.float32) + delta).to(y.dtype), mask=cmask)


# lora_add_'s (BLOCK_K, BLOCK_OUT, num_warps, num_stages, programs to aim for: each token's
# output columns are split until (tokens x parts x splits) reaches it, at most 16 splits)
LORA_CONFIG = (1024, 256, 4, 3, 264)


def lora_add_(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    row_weights: torch.Tensor,
    token_rows: torch.Tensor,
    part_sizes: list[int],
    rank: int,
    config: tuple[int, int, int, int] | None = None,
) -> torch.Tensor:
    """Per-row multi-LoRA added in place to a linear layer's output y [T, out]; returns y.

    x [T, in]; lora_a [in, S*P*r] and lora_b [S*P*r, out] hold S slots of P parts (q|k|v,
    gate|up or one part) of rank r, slot-major, part p of a slot mapping only into part p's
    output columns; row_weights [rows, S] (one-hot for one adapter, a router mix, zero = base);
    token_rows int64 [T]. One kernel: each (token, part, column chunk) program computes the
    token's rank-r projection for the slots its row uses and adds its share of the output, so
    a slot the row does not use costs nothing. Large T (prefill) uses the torch form.
    `config`: see LORA_CONFIG (the default).
    """
    num_parts = len(part_sizes)
    if not use_triton(x) or x.shape[0] > 512:
        return lora_add_ref(y, x, lora_a, lora_b, row_weights, token_rows, num_parts, rank)
    x = x if x.stride(-1) == 1 else x.contiguous()
    tokens, k_dim = x.shape
    ends = [sum(part_sizes[: i + 1]) for i in range(num_parts)] + [0] * (3 - num_parts)
    block_k, block_out, warps, stages, programs = config or LORA_CONFIG
    n_split = max(1, min(16, triton.cdiv(programs, tokens * num_parts)))
    _lora_add_kernel[(tokens, num_parts, n_split)](
        y,
        x,
        lora_a,
        lora_b,
        row_weights,
        token_rows,
        y.stride(0),
        x.stride(0),
        lora_a.stride(0),
        lora_b.stride(0),
        row_weights.stride(0),
        k_dim,
        row_weights.shape[1],
        rank,
        num_parts,
        ends[0],
        ends[1],
        ends[2],
        n_split,
        R_PAD=max(2, triton.next_power_of_2(rank)),
        BLOCK_K=block_k,
        BLOCK_OUT=block_out,
        num_warps=warps,
        num_stages=stages,
        **pdl_options(),
    )
    return y


@dataclass
class RowLoRA:
    """A linear layer's stacked LoRA slots with this step's per-row slot weights (the
    arguments of `lora_add_`): lora_a [in, S*P*r], lora_b [S*P*r, out], row_weights [rows, S],
    token_rows int64 [T], the P output parts' sizes and the slot rank r."""

    lora_a: torch.Tensor
    lora_b: torch.Tensor
    row_weights: torch.Tensor
    token_rows: torch.Tensor
    part_sizes: list[int]
    rank: int

    @property
    def num_slots(self) -> int:
        return self.row_weights.shape[1]

    def key(self) -> tuple:
        """What the tuner's choice depends on: part sizes, slots and rank."""
        return tuple(self.part_sizes), self.num_slots, self.rank

    def add_(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """y += this LoRA of x, in place (`lora_add_`); returns y."""
        return lora_add_(
            y, x, self.lora_a, self.lora_b, self.row_weights, self.token_rows, self.part_sizes,
            self.rank,
        )  # fmt: skip
