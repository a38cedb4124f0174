"""Prefill attention: causal attention of every row's new tokens over its paged KV cache, in one
launch for the whole step (varlen flash attention in Triton), with its torch reference.

A step's query tokens are flat, q [T, H, D], row i's tokens at cu_seqlens_q[i]:cu_seqlens_q[i+1].
They are the last q_len = cu_seqlens_q[i+1] - cu_seqlens_q[i] of row i's context_lens[i] tokens,
so they sit at positions context_lens[i] - q_len onwards and attend causally to every key of the
row up to their own position. All keys, the step's new ones included (already written by
`qk_norm_rope_store`), are read from the paged cache through the row's block table: a chunk of a
long prompt, a prompt after cached prefix blocks, forced tokens after a decode, and decode rows
(q_len 1) mixed into a prefill step all take the same path. Cache layout: models.engine.attention.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from models.engine.kernels.launch import tl, triton

# TANDEM_PREFILL_TRITON=0 sends CUDA prefill through the torch reference too (A/B checks)
ENABLED = os.environ.get("TANDEM_PREFILL_TRITON", "1") != "0"


def prefill_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """The torch reference (CPU path): one masked SDPA per row. Reads the row bounds to the host
    once per call; returns q's shape."""
    head_dim = q.shape[2]
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    starts, ctxs = cu_seqlens_q.tolist(), context_lens.tolist()
    outputs = []
    for row, ctx in enumerate(ctxs):
        start, end = starts[row], starts[row + 1]
        blocks = block_tables[row, : (ctx + block_size - 1) // block_size].long()
        k = k_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:ctx]
        v = v_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:ctx]
        q_pos = torch.arange(ctx - (end - start), ctx, device=q.device)
        mask = torch.arange(ctx, device=q.device)[None, :] <= q_pos[:, None]
        out = F.scaled_dot_product_attention(
            q[start:end].transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask,
            scale=scale, enable_gqa=True,
        )  # fmt: skip
        outputs.append(out.transpose(0, 1))
    return torch.cat(outputs, dim=0)


if triton is not None:

    @triton.jit
    def _attend_block(
        acc, m_i, l_i, q, start_n, row_table, k_cache_ptr, v_cache_ptr, kv_head_off,
        q_pos, ctx, offs_n, offs_d, d_mask, stride_kb, stride_ks, stride_vb, stride_vs,
        scale_log2, BLOCK_SIZE: tl.constexpr, CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ):  # fmt: skip
        """Online-softmax update of one tile's accumulators with keys start_n .. start_n+BLOCK_N:
        each key's cache block is looked up in the row's block table."""
        pos = start_n + offs_n
        in_ctx = pos < ctx
        block = tl.load(row_table + pos // BLOCK_SIZE, mask=in_ctx, other=0)
        slot = pos % BLOCK_SIZE
        kv_mask = in_ctx[:, None] & d_mask[None, :]
        k = tl.load(
            k_cache_ptr + block[:, None] * stride_kb + slot[:, None] * stride_ks + kv_head_off
            + offs_d[None, :], mask=kv_mask, other=0.0,
        )  # fmt: skip
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
        if CAUSAL:
            s = tl.where((pos[None, :] <= q_pos[:, None]) & in_ctx[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(
            v_cache_ptr + block[:, None] * stride_vb + slot[:, None] * stride_vs + kv_head_off
            + offs_d[None, :], mask=kv_mask, other=0.0,
        )  # fmt: skip
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        return acc, m_new, l_i

    # the block-table width changes every step: specializing on it (== 1, multiple of 16) would
    # compile a new variant mid-run
    @triton.jit(do_not_specialize=["stride_bt"])
    def _prefill_attention_kernel(
        q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, block_tables_ptr, cu_seqlens_ptr,
        context_lens_ptr, scale_log2, stride_qt, stride_qh, stride_ot, stride_oh,
        stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_bt,
        GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_TOK: tl.constexpr, BLOCK_N: tl.constexpr,
        HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
    ):  # fmt: skip
        """One program: BLOCK_TOK query tokens of one row times the GROUP query heads of one KV
        head (GQA: the tile's rows share each K/V load), over all its visible keys."""
        # the grid's first axis runs the row's later (longer) tiles first: better tail balance
        tile = tl.num_programs(0) - 1 - tl.program_id(0)
        row = tl.program_id(1)
        kv_head = tl.program_id(2)
        q_start = tl.load(cu_seqlens_ptr + row)
        q_len = tl.load(cu_seqlens_ptr + row + 1) - q_start
        if tile * BLOCK_TOK >= q_len:
            return
        ctx = tl.load(context_lens_ptr + row)
        first_pos = ctx - q_len  # position of the row's first new token
        BLOCK_M: tl.constexpr = BLOCK_TOK * GROUP_PAD
        offs_m = tl.arange(0, BLOCK_M)
        tok = tile * BLOCK_TOK + offs_m // GROUP_PAD  # tile row r: token r // GP, head r % GP
        head = kv_head * GROUP + offs_m % GROUP_PAD
        m_valid = (tok < q_len) & (offs_m % GROUP_PAD < GROUP)
        q_pos = first_pos + tok
        offs_d = tl.arange(0, HEAD_PAD)
        d_mask = offs_d < HEAD_DIM
        q_off = (q_start + tok)[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :]
        q = tl.load(q_ptr + q_off, mask=m_valid[:, None] & d_mask[None, :], other=0.0)
        offs_n = tl.arange(0, BLOCK_N)
        row_table = block_tables_ptr + row * stride_bt
        kv_head_off = kv_head * stride_kh
        m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)  # finite: fully masked rows stay 0
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_PAD], dtype=tl.float32)
        tile_first = first_pos + tile * BLOCK_TOK
        # keys before the tile's first position are visible to every query of the tile
        unmasked_end = (tile_first // BLOCK_N) * BLOCK_N
        kv_end = tl.minimum(ctx, tile_first + BLOCK_TOK)
        for start_n in range(0, unmasked_end, BLOCK_N):
            acc, m_i, l_i = _attend_block(
                acc, m_i, l_i, q, start_n, row_table, k_cache_ptr, v_cache_ptr, kv_head_off,
                q_pos, ctx, offs_n, offs_d, d_mask, stride_kb, stride_ks, stride_vb, stride_vs,
                scale_log2, BLOCK_SIZE, False, DOT_PRECISION,
            )  # fmt: skip
        for start_n in range(unmasked_end, kv_end, BLOCK_N):
            acc, m_i, l_i = _attend_block(
                acc, m_i, l_i, q, start_n, row_table, k_cache_ptr, v_cache_ptr, kv_head_off,
                q_pos, ctx, offs_n, offs_d, d_mask, stride_kb, stride_ks, stride_vb, stride_vs,
                scale_log2, BLOCK_SIZE, True, DOT_PRECISION,
            )  # fmt: skip
        acc = acc / l_i[:, None]
        o_off = (q_start + tok)[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :]
        tl.store(
            out_ptr + o_off,
            acc.to(out_ptr.dtype.element_ty),
            mask=m_valid[:, None] & d_mask[None, :],
        )


def tile_shape(dtype: torch.dtype, group_pad: int, head_dim: int) -> tuple[int, int, int, int]:
    """(query tokens per tile, keys per block, warps, pipeline stages): 128 query rows (tokens x
    the padded heads of a GQA group) and 64 keys per block for 16-bit types; fp32 halves both to
    fit shared memory."""
    rows, block_n = (128, 64) if dtype.itemsize == 2 else (64, 32)
    if head_dim > 128:
        rows //= 2
    rows = max(rows, group_pad)  # at least one token per tile
    return max(1, rows // group_pad), block_n, 8 if rows * head_dim >= 128 * 128 else 4, 2


def prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    max_query_len: int,
    scale: float,
) -> torch.Tensor:
    """Causal attention of a step's new tokens over the paged cache (see the module docstring).

    q [T, H, D] (any strides with unit stride in D: a view of the fused qkv output works), H a
    multiple of the KV heads; k_cache/v_cache [num_blocks, block_size, KVH, D] already holding
    the new tokens; block_tables int32 [B, max_blocks]; cu_seqlens_q int32 [B + 1]; context_lens
    int32 [B]; max_query_len the longest row's new tokens (host int: it sizes the grid, so no
    device value is read). Returns [T, H, D] in q's dtype. One launch on CUDA, no host sync.
    """
    if triton is None or not q.is_cuda or not ENABLED:
        return prefill_attention_ref(
            q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale
        )
    return _launch(
        q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, max_query_len, scale
    )


def _launch(
    q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, max_query_len, scale,
    config: tuple[int, int, int, int] | None = None,
):  # fmt: skip
    """The kernel's launch; `config` overrides tile_shape's (tile rows, BLOCK_N, warps, stages)
    (benchmarks)."""
    tokens, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_heads // num_kv_heads
    group_pad = triton.next_power_of_2(group)
    block_tok, block_n, warps, stages = tile_shape(q.dtype, group_pad, head_dim)
    if config is not None:
        rows, block_n, warps, stages = config
        block_tok = max(1, rows // group_pad)
    out = torch.empty(tokens, num_heads, head_dim, device=q.device, dtype=q.dtype)
    grid = (triton.cdiv(max_query_len, block_tok), block_tables.shape[0], num_kv_heads)
    _prefill_attention_kernel[grid](
        q, k_cache, v_cache, out, block_tables, cu_seqlens_q, context_lens,
        scale * 1.4426950408889634, q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0),
        v_cache.stride(1), block_tables.stride(0),
        GROUP=group, GROUP_PAD=group_pad, BLOCK_TOK=block_tok, BLOCK_N=block_n, HEAD_DIM=head_dim,
        HEAD_PAD=max(16, triton.next_power_of_2(head_dim)), BLOCK_SIZE=block_size,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return out
