"""The skinny GEMM for decode-sized matmuls (few rows, big weight): the Triton kernel (plain,
split-K partial sums, gated silu * up, with a fused per-row LoRA), the silu-and-mul kernel,
and the launch configs the tuner picks among (models.engine.kernels.tuning).
"""

from __future__ import annotations

import torch

from models.engine.kernels.launch import (
    HAS_TRITON,
    dot_precision,
    pdl_options,
    tl,
    triton,
    use_triton,
)
from models.engine.kernels.lora import RowLoRA


def silu_and_mul_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up (torch)."""
    return torch.nn.functional.silu(gate) * up


if HAS_TRITON:
    from models.engine.kernels.launch import pdl_start

    @triton.jit
    def _skinny_linear_kernel(
        x_ptr,
        w_ptr,
        bias_ptr,
        y_ptr,
        a_ptr,
        b_ptr,
        lw_ptr,
        rows_ptr,
        rows,
        n_out,
        k_dim,
        stride_x,
        stride_w,
        stride_y,
        stride_split,
        stride_a,
        stride_b,
        stride_lw,
        end0,
        end1,
        lora_cols,
        HAS_BIAS: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        SPLIT_K: tl.constexpr,
        GATED: tl.constexpr,
        HAS_LORA: tl.constexpr,
        LORA_R: tl.constexpr,
        RANK: tl.constexpr,
        NUM_PARTS: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
        USE_PDL: tl.constexpr,
    ):
        """y = x @ w.T (+ bias), or split-K partial sums; GATED (no split, no bias): w is
        [gate; up], each n_out rows, and y = silu(x @ gate.T) * (x @ up.T).

        HAS_LORA adds the per-row LoRA of `lora_add_` (a, b, row weights lw, token rows): the
        program's output columns lie in one part (part ends end0, end1), so only that part's
        `lora_cols` = slots x RANK columns of A and rows of B reach them. Linear in K, so each
        split adds its K range's share into its partial sum."""
        pdl_start(USE_PDL)
        split = tl.program_id(1)
        k_per_split = tl.cdiv(tl.cdiv(k_dim, BLOCK_K), SPLIT_K) * BLOCK_K
        k_start = split * k_per_split
        k_end = tl.minimum(k_start + k_per_split, k_dim)
        n0 = tl.program_id(0) * BLOCK_N
        offs_m = tl.arange(0, BLOCK_M)
        offs_n = n0 + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        mmask = offs_m < rows
        nmask = offs_n < n_out
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        acc_up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        w_rows = w_ptr + offs_n[:, None].to(tl.int64) * stride_w
        up_rows = w_rows + n_out * stride_w
        # LoRA: column j of the part's slice is rank j % RANK of slot j // RANK (GATED: the
        # gate's part; the up part's columns follow RANK later)
        part = (n0 >= end0).to(tl.int32) + (n0 >= end1).to(tl.int32)
        j = tl.arange(0, LORA_R)
        jmask = j < lora_cols
        lora_col = ((j // RANK) * NUM_PARTS + part) * RANK + j % RANK
        t = tl.zeros([BLOCK_M, LORA_R], tl.float32)
        t_up = tl.zeros([BLOCK_M, LORA_R], tl.float32)
        for k0 in range(k_start, k_end, BLOCK_K):
            k = k0 + offs_k
            kmask = k < k_end
            x = tl.load(
                x_ptr + offs_m[:, None] * stride_x + k[None, :],
                mask=mmask[:, None] & kmask[None, :],
                other=0.0,
            )
            w = tl.load(w_rows + k[None, :], mask=nmask[:, None] & kmask[None, :], other=0.0)
            acc += tl.dot(x, tl.trans(w), input_precision=DOT_PRECISION)
            if GATED:
                u = tl.load(up_rows + k[None, :], mask=nmask[:, None] & kmask[None, :], other=0.0)
                acc_up += tl.dot(x, tl.trans(u), input_precision=DOT_PRECISION)
            if HAS_LORA:
                a_tile = a_ptr + k[:, None] * stride_a + lora_col[None, :]
                amask = kmask[:, None] & jmask[None, :]
                t += tl.dot(x, tl.load(a_tile, mask=amask, other=0.0), input_precision=DOT_PRECISION)
                if GATED:
                    a = tl.load(a_tile + RANK, mask=amask, other=0.0)
                    t_up += tl.dot(x, a, input_precision=DOT_PRECISION)
        if HAS_LORA:  # weight each (row, slot) by the row's mix, then map into the outputs
            token_row = tl.load(rows_ptr + offs_m, mask=mmask, other=0)
            mix = tl.load(
                lw_ptr + token_row[:, None] * stride_lw + (j // RANK)[None, :],
                mask=mmask[:, None] & jmask[None, :],
                other=0.0,
            ).to(tl.float32)
            # in float32, as lora_add_ does: x @ A is large next to the delta it gives
            b_tile = b_ptr + lora_col[:, None] * stride_b + offs_n[None, :]
            bmask = jmask[:, None] & nmask[None, :]
            b = tl.load(b_tile, mask=bmask, other=0.0).to(tl.float32)
            acc += tl.dot(t * mix, b, input_precision="ieee")
            if GATED:
                b = tl.load(b_tile + RANK * stride_b + n_out, mask=bmask, other=0.0)
                acc_up += tl.dot(t_up * mix, b.to(tl.float32), input_precision="ieee")
        if GATED:  # rounded as the unfused path rounds the gate_up output, then silu * up
            dtype = y_ptr.dtype.element_ty
            gate = acc.to(dtype).to(tl.float32)
            acc = gate / (1.0 + tl.exp(-gate)) * acc_up.to(dtype).to(tl.float32)
        if HAS_BIAS:
            if split == 0:
                acc += tl.load(bias_ptr + offs_n, mask=nmask, other=0.0).to(tl.float32)[None, :]
        tl.store(
            y_ptr + split * stride_split + offs_m[:, None] * stride_y + offs_n[None, :],
            acc.to(y_ptr.dtype.element_ty),
            mask=mmask[:, None] & nmask[None, :],
        )

    @triton.jit
    def _silu_and_mul_kernel(
        gate_ptr, up_ptr, out_ptr, stride_g, stride_u, stride_o, n_cols, BLOCK: tl.constexpr,
        USE_PDL: tl.constexpr,
    ):
        pdl_start(USE_PDL)
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_cols
        g = tl.load(gate_ptr + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(up_ptr + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
        y = g / (1.0 + tl.exp(-g)) * u
        tl.store(out_ptr + row * stride_o + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, fused. gate and up [T, I] (the two halves of a fused gate_up output
    work: unit stride in the last dim is all that is needed)."""
    if not use_triton(gate):
        return silu_and_mul_ref(gate, up)
    gate2 = gate.reshape(-1, gate.shape[-1])
    up2 = up.reshape(-1, up.shape[-1])
    n_cols = gate2.shape[-1]
    out = torch.empty(gate2.shape, device=gate.device, dtype=gate.dtype)
    block = min(2048, triton.next_power_of_2(n_cols))
    _silu_and_mul_kernel[(gate2.shape[0], triton.cdiv(n_cols, block))](
        gate2,
        up2,
        out,
        gate2.stride(0),
        up2.stride(0),
        out.stride(0),
        n_cols,
        BLOCK=block,
        num_warps=4,
        **pdl_options(),
    )
    return out.view(gate.shape)


SKINNY_CONFIGS = [  # (BLOCK_N, BLOCK_K, num_warps, num_stages)
    (16, 256, 4, 4),
    (16, 512, 4, 3),
    (32, 256, 4, 4),
    (32, 128, 4, 6),
    (64, 128, 4, 4),
    (32, 512, 8, 3),
    (16, 1024, 8, 2),
    (16, 128, 2, 8),
]
SPLIT_CONFIGS = [  # (BLOCK_N, BLOCK_K, num_warps, num_stages, SPLIT_K): partial sums
    (16, 256, 4, 4, 2),
    (16, 256, 4, 4, 4),
    (16, 128, 4, 4, 8),
    (32, 256, 4, 4, 4),
    (16, 512, 4, 3, 4),
    (16, 128, 4, 4, 4),  # square ~8 MB weights (o_proj): more programs, shorter K each
    (16, 128, 2, 4, 8),
    (32, 128, 4, 4, 8),
    (16, 64, 2, 4, 16),
]
# split-K configs only the fused LoRA times: every program reads its K range of the LoRA's A,
# so wider output blocks (fewer programs) read less of it (H200, o / down of Qwen3-0.6B at
# 2 rows: 4.9 / 5.9 us against 5.5 / 6.8 for the best of SPLIT_CONFIGS)
LORA_SPLIT_CONFIGS = [(64, 64, 4, 4, 8)]
GATED_CONFIGS = SKINNY_CONFIGS + [  # silu_mul_linear loads two weight tiles per step
    (32, 128, 4, 3),
    (16, 128, 4, 6),
    (64, 64, 4, 4),
    (32, 64, 4, 6),
]


# LoRA columns (slots x rank) per part that the skinny kernel may carry: every program reads
# all of them, used or not, where `lora_add_` skips a slot no row uses (8 adapters of rank 16)
MAX_FUSED_LORA_COLUMNS = 64


def linear_configs(partials: bool = False, gated: bool = False) -> list[tuple]:
    """The skinny configs the tuner times for a call of that kind."""
    if gated:
        return GATED_CONFIGS
    return SKINNY_CONFIGS + (SPLIT_CONFIGS if partials else [])


def fused_lora_configs(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora: RowLoRA,
    partials: bool = False,
    gated: bool = False,
) -> list[tuple]:
    """The skinny configs that can carry this LoRA inside the matmul: no output block may
    straddle two parts (each part size a multiple of BLOCK_N); none when the LoRA is wider than
    MAX_FUSED_LORA_COLUMNS per part or its tensors are strided."""
    parts = lora.part_sizes
    if lora.num_slots * lora.rank > MAX_FUSED_LORA_COLUMNS or sum(parts) != weight.shape[0]:
        return []
    if lora.lora_a.stride(-1) != 1 or lora.lora_b.stride(-1) != 1:
        return []
    if gated and (bias is not None or len(parts) != 2 or parts[0] != parts[1]):
        return []
    configs = linear_configs(partials, gated) + (LORA_SPLIT_CONFIGS if partials else [])
    return [c for c in configs if all(p % c[0] == 0 for p in parts)]


def skinny_linear(x, weight, bias, config, gated: bool = False, lora: RowLoRA | None = None):
    """[rows, out] in x's dtype; with a split-K config, float32 partial sums [S, rows, out];
    gated: [rows, out / 2], silu of the first half times the second. With `lora` (whose
    parts the config's BLOCK_N divides) the per-row LoRA is added inside."""
    block_n, block_k, warps, stages, *rest = config
    split = rest[0] if rest else 1
    rows, n_out = x.shape[0], weight.shape[0] // (2 if gated else 1)
    if split > 1:
        y = torch.empty(split, rows, n_out, device=x.device, dtype=torch.float32)
    else:
        y = torch.empty(rows, n_out, device=x.device, dtype=x.dtype)
    ends = [n_out, n_out]
    lora_cols = lora.num_slots * lora.rank if lora is not None else 0
    if lora is not None:
        ends = ([sum(lora.part_sizes[: i + 1]) for i in range(len(lora.part_sizes))] + ends)[:2]
        a, b, lw, token_rows = lora.lora_a, lora.lora_b, lora.row_weights, lora.token_rows
    else:
        a = b = lw = token_rows = weight
    _skinny_linear_kernel[(triton.cdiv(n_out, block_n), split)](
        x,
        weight,
        bias if bias is not None else weight,
        y,
        a,
        b,
        lw,
        token_rows,
        rows,
        n_out,
        x.shape[1],
        x.stride(0),
        weight.stride(0),
        y.stride(-2),
        rows * n_out,
        a.stride(0) if lora is not None else 0,
        b.stride(0) if lora is not None else 0,
        lw.stride(0) if lora is not None else 0,
        ends[0],
        ends[1],
        lora_cols,
        HAS_BIAS=bias is not None,
        BLOCK_M=16 if rows <= 16 else 32,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        SPLIT_K=split,
        GATED=gated,
        HAS_LORA=lora is not None,
        LORA_R=max(16, triton.next_power_of_2(lora_cols)),
        RANK=lora.rank if lora is not None else 16,
        NUM_PARTS=len(lora.part_sizes) if lora is not None else 1,
        DOT_PRECISION=dot_precision(x),
        num_warps=warps,
        num_stages=stages,
        **pdl_options(),
    )
    return y
