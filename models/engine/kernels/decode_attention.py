"""Paged decode attention (flash-decoding): one new query token per row over its paged KV
cache, split into partitions attended in parallel and merged by a second kernel; its torch
reference next to it. The layer in models.engine.attention picks one of the two.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from models.engine.kernels.launch import HAS_TRITON, dot_precision, pdl_options, tl, triton
from models.engine.kernels.norm_rope import qk_norm_rope_store


def paged_decode_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Decode attention over a paged KV cache, one query token per row (torch, any device).

    q [B, H, D]; returns [B, H, D] in q's dtype, computed in float32. A row with context length
    0 gives zeros. Gather + masked SDPA: static shapes, no host sync (a CUDA graph can hold it).
    """
    batch, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    max_len = block_tables.shape[1] * k_cache.shape[1]
    k = k_cache[block_tables.long()].reshape(batch, max_len, num_kv_heads, head_dim).float()
    v = v_cache[block_tables.long()].reshape(batch, max_len, num_kv_heads, head_dim).float()
    positions = torch.arange(max_len, device=q.device)
    mask = (positions[None, :] < context_lens[:, None]).view(batch, 1, 1, max_len)
    # enable_gqa: query head h reads KV head h // group, without materialising the expansion
    out = F.scaled_dot_product_attention(
        q.float().unsqueeze(2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=scale,
        enable_gqa=True,
    ).squeeze(2)
    # zeros for a row with nothing to attend to (as the kernel), whatever SDPA makes of it
    return torch.where(context_lens[:, None, None] > 0, out, 0.0).to(q.dtype)


if HAS_TRITON:
    from models.engine.kernels.launch import pdl_start

    @triton.jit
    def _paged_decode_kernel(
        q_ptr,
        k_cache_ptr,
        v_cache_ptr,
        block_tables_ptr,
        context_lens_ptr,
        out_ptr,
        part_out_ptr,
        part_ml_ptr,
        k_new_ptr,
        v_new_ptr,
        pos_ptr,
        cos_ptr,
        sin_ptr,
        qw_ptr,
        kw_ptr,
        slot_ptr,
        eps,
        scale_log2,
        stride_qb,
        stride_qh,
        stride_knb,
        stride_knh,
        stride_vnb,
        stride_vnh,
        stride_cos,
        stride_kb,
        stride_ks,
        stride_kh,
        stride_vb,
        stride_vs,
        stride_vh,
        stride_bt,
        stride_ob,
        stride_oh,
        num_heads,
        max_parts,
        GROUP: tl.constexpr,
        GROUP_PAD: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,
        PARTITION: tl.constexpr,
        BLOCK_N: tl.constexpr,
        SPLIT: tl.constexpr,
        NEW_TOKEN: tl.constexpr,
        HAS_NORM: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
        USE_PDL: tl.constexpr,
    ):
        pdl_start(USE_PDL)
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        part = tl.program_id(2)
        ctx = tl.load(context_lens_ptr + b)
        start = part * PARTITION
        if SPLIT:
            if start >= ctx:
                return
        end = tl.minimum(start + PARTITION, ctx)

        g = tl.arange(0, GROUP_PAD)
        d = tl.arange(0, HEAD_DIM)
        heads = kvh * GROUP + g
        gmask = g < GROUP
        q_rows = q_ptr + b * stride_qb + heads[:, None] * stride_qh
        if NEW_TOKEN:
            # q and the new k are raw: norm and rotate them here (as qk_norm_rope_store does),
            # and the program whose partition holds the new token writes its k and v into the
            # cache before attending (the barrier makes them visible to its own loads)
            half = HEAD_DIM // 2
            other = (d + half) % HEAD_DIM
            pos = tl.load(pos_ptr + b).to(tl.int64)
            c = tl.load(cos_ptr + pos * stride_cos + d % half)
            sn = tl.load(sin_ptr + pos * stride_cos + d % half)
            sn = tl.where(d < half, -sn, sn)
            q = _norm_rope(q_rows, d, other, gmask, qw_ptr, c, sn, eps, HEAD_DIM, HAS_NORM)
            if (ctx > 0) & (part == (ctx - 1) // PARTITION):
                slot = tl.load(slot_ptr + b).to(tl.int64)
                first = (g < 1) & (slot >= 0)  # one row of the tile; slot -1 writes nothing
                k_rows = k_new_ptr + b * stride_knb + kvh * stride_knh + g[:, None] * 0
                k = _norm_rope(k_rows, d, other, first, kw_ptr, c, sn, eps, HEAD_DIM, HAS_NORM)
                v = tl.load(
                    v_new_ptr + b * stride_vnb + kvh * stride_vnh + g[:, None] * 0 + d[None, :],
                    mask=first[:, None],
                    other=0.0,
                )
                blk = slot // BLOCK_SIZE
                off = slot % BLOCK_SIZE
                cell = blk * stride_kb + off * stride_ks + kvh * stride_kh + g[:, None] * 0
                tl.store(k_cache_ptr + cell + d[None, :], k, mask=first[:, None])
                cell = blk * stride_vb + off * stride_vs + kvh * stride_vh + g[:, None] * 0
                tl.store(v_cache_ptr + cell + d[None, :], v, mask=first[:, None])
                tl.debug_barrier()
        else:
            q = tl.load(q_rows + d[None, :], mask=gmask[:, None], other=0.0)
        m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([GROUP_PAD], tl.float32)
        acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
        bt_row = block_tables_ptr + b * stride_bt
        for n0 in range(start, end, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            nmask = n < end
            blk = tl.load(bt_row + n // BLOCK_SIZE, mask=nmask, other=0).to(tl.int64)
            off = n % BLOCK_SIZE
            k = tl.load(
                k_cache_ptr
                + blk[:, None] * stride_kb
                + off[:, None] * stride_ks
                + kvh * stride_kh
                + d[None, :],
                mask=nmask[:, None],
                other=0.0,
            )
            v = tl.load(
                v_cache_ptr
                + blk[:, None] * stride_vb
                + off[:, None] * stride_vs
                + kvh * stride_vh
                + d[None, :],
                mask=nmask[:, None],
                other=0.0,
            )
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
            s = tl.where(nmask[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.math.exp2(m_i - m_new)
            p = tl.math.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
            m_i = m_new

        if SPLIT:
            row = (b * num_heads + heads) * max_parts + part
            tl.store(
                part_out_ptr + row[:, None] * HEAD_DIM + d[None, :],
                acc / l_i[:, None],
                mask=gmask[:, None],
            )
            tl.store(part_ml_ptr + row * 2, m_i, mask=gmask)
            tl.store(part_ml_ptr + row * 2 + 1, l_i, mask=gmask)
        else:
            o = acc / tl.maximum(l_i, 1e-30)[:, None]
            tl.store(
                out_ptr + b * stride_ob + heads[:, None] * stride_oh + d[None, :],
                o.to(out_ptr.dtype.element_ty),
                mask=gmask[:, None],
            )

    @triton.jit
    def _norm_rope(rows, d, other, rmask, w_ptr, c, sn, eps, HEAD_DIM: tl.constexpr, HAS_NORM: tl.constexpr):
        """Per-row RMSNorm (with weight) and neox RoPE of raw head vectors [R, HEAD_DIM] at
        `rows` (pointers to each row's start), rounded like qk_norm_rope_store: `other` is
        each lane's partner in the other half, c / sn the position's cos and signed sin."""
        x = tl.load(rows + d[None, :], mask=rmask[:, None], other=0.0)
        xo = tl.load(rows + other[None, :], mask=rmask[:, None], other=0.0)
        dtype = x.dtype
        if HAS_NORM:
            f = x.to(tl.float32)
            fo = xo.to(tl.float32)
            r = tl.math.rsqrt(tl.sum(f * f, 1) / HEAD_DIM + eps)[:, None]
            x = (tl.load(w_ptr + d).to(tl.float32)[None, :] * (f * r).to(dtype).to(tl.float32))
            xo = (tl.load(w_ptr + other).to(tl.float32)[None, :] * (fo * r).to(dtype).to(tl.float32))
            x = x.to(dtype)
            xo = xo.to(dtype)
        return (x.to(tl.float32) * c[None, :] + xo.to(tl.float32) * sn[None, :]).to(dtype)

    @triton.jit
    def _paged_decode_reduce_kernel(
        out_ptr,
        part_out_ptr,
        part_ml_ptr,
        context_lens_ptr,
        stride_ob,
        stride_oh,
        num_heads,
        max_parts,
        HEAD_DIM: tl.constexpr,
        PARTITION: tl.constexpr,
        PARTS_CHUNK: tl.constexpr,
        USE_PDL: tl.constexpr,
    ):
        pdl_start(USE_PDL)
        b = tl.program_id(0)
        h = tl.program_id(1)
        ctx = tl.load(context_lens_ptr + b)
        num_parts = tl.cdiv(ctx, PARTITION)
        d = tl.arange(0, HEAD_DIM)
        base = (b * num_heads + h) * max_parts
        l_run = tl.sum(tl.zeros([PARTS_CHUNK], tl.float32), 0)
        m_run = l_run + float("-inf")
        acc = tl.zeros([HEAD_DIM], tl.float32)
        for p0 in range(0, num_parts, PARTS_CHUNK):
            p = p0 + tl.arange(0, PARTS_CHUNK)
            pmask = p < num_parts
            row = base + p
            m = tl.load(part_ml_ptr + row * 2, mask=pmask, other=float("-inf"))
            l_part = tl.load(part_ml_ptr + row * 2 + 1, mask=pmask, other=0.0)
            m_new = tl.maximum(m_run, tl.max(m, 0))
            w = tl.where(pmask, tl.math.exp2(m - m_new) * l_part, 0.0)
            old = tl.math.exp2(m_run - m_new)
            o = tl.load(
                part_out_ptr + row[:, None] * HEAD_DIM + d[None, :], mask=pmask[:, None], other=0.0
            )
            acc = acc * old + tl.sum(o * w[:, None], 0)
            l_run = l_run * old + tl.sum(w, 0)
            m_run = m_new
        o = acc / tl.maximum(l_run, 1e-30)
        tl.store(out_ptr + b * stride_ob + h * stride_oh + d, o.to(out_ptr.dtype.element_ty))


MAX_DECODE_PROGRAMS = 8192  # (row, KV head, partition) programs of one decode attention


def decode_partition_size(batch: int, num_kv_heads: int, max_context: int) -> int:
    """Tokens per split-K partition: small when few (row, KV head) pairs would leave the GPU
    idle, larger when the batch alone fills it. Depends on shapes only (graph-safe)."""
    pairs = batch * num_kv_heads
    base = 64 if pairs < 64 else 128 if pairs < 512 else 512
    while max_context > 1024 * base:
        base *= 2
    # The grid covers the longest context the block tables allow (a graph's static shape);
    # programs past a row's real context exit at once, but tens of thousands of them still
    # cost launch time (a 16k-token model at 32 rows: 27 us per layer for 190-token contexts).
    while pairs * -(-max_context // base) > MAX_DECODE_PROGRAMS and base < max_context:
        base *= 2
    return base


@dataclass
class NewToken:
    """A decode step's new token, still raw, for `paged_decode_attention` to finish: k and v
    [B, KVH, D] (views of the fused qkv output), positions [B], cos/sin [max_pos, D/2] float32,
    the q / k norm weights (None: no q/k norm) and the cache slots [B]."""

    k: torch.Tensor
    v: torch.Tensor
    positions: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    q_norm_weight: torch.Tensor | None
    k_norm_weight: torch.Tensor | None
    eps: float
    slot_mapping: torch.Tensor

    def prepare(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
        """What the fused kernel does first, done apart: q and k normed and rotated in place,
        k and v written into the cache."""
        qk_norm_rope_store(
            q, self.k, self.v, self.positions, self.cos, self.sin, self.q_norm_weight,
            self.k_norm_weight, self.eps, k_cache, v_cache, self.slot_mapping,
        )  # fmt: skip


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    partition_size: int | None = None,
    new_token: NewToken | None = None,
) -> torch.Tensor:
    """Attention of one new query token per row over its paged KV cache (flash-decoding).

    q [B, H, D] (D a power of two, H a multiple of the KV heads); k_cache/v_cache
    [num_blocks, block_size, KVH, D]; block_tables int32 [B, max_blocks]; context_lens int32 [B]
    (tokens to attend to, the new one included; 0 for a padding row, which gives zeros).
    Long contexts are cut into partitions attended in parallel and merged by a second kernel;
    the partition count depends only on shapes, so the call can be captured in a CUDA graph.
    With `new_token`, q is raw (before q norm and RoPE) and the step's new k / v are not in the
    cache yet: the kernel does what `qk_norm_rope_store` would first (q is left as it was), which
    saves that launch. Returns [B, H, D] in q's dtype. Triton on CUDA only:
    `paged_decode_attention_ref` is the torch form (models.engine.attention picks).
    """
    batch, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_heads // num_kv_heads
    max_context = block_tables.shape[1] * block_size
    partition = partition_size or decode_partition_size(batch, num_kv_heads, max_context)
    max_parts = triton.cdiv(max_context, partition)
    split = max_parts > 1
    out = torch.empty_like(q)
    if split:
        part_out = torch.empty(
            batch, num_heads, max_parts, head_dim, device=q.device, dtype=torch.float32
        )
        part_ml = torch.empty(batch, num_heads, max_parts, 2, device=q.device, dtype=torch.float32)
    else:
        part_out = part_ml = out
    new = new_token
    if new is not None and (k_cache.stride(-1) != 1 or new.k.stride(-1) != 1):
        new.prepare(q, k_cache, v_cache)  # the kernel wants unit-stride head vectors
        new = None
    norm_w = (new.q_norm_weight, new.k_norm_weight) if new is not None else (None, None)
    _paged_decode_kernel[(batch, num_kv_heads, max_parts)](
        q,
        k_cache,
        v_cache,
        block_tables,
        context_lens,
        out,
        part_out,
        part_ml,
        new.k if new is not None else q,
        new.v if new is not None else q,
        new.positions if new is not None else context_lens,
        new.cos if new is not None else q,
        new.sin if new is not None else q,
        norm_w[0] if norm_w[0] is not None else q,
        norm_w[1] if norm_w[1] is not None else q,
        new.slot_mapping if new is not None else context_lens,
        new.eps if new is not None else 0.0,
        scale * 1.4426950408889634,
        q.stride(0),
        q.stride(1),
        new.k.stride(0) if new is not None else 0,
        new.k.stride(1) if new is not None else 0,
        new.v.stride(0) if new is not None else 0,
        new.v.stride(1) if new is not None else 0,
        new.cos.stride(0) if new is not None else 0,
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        block_tables.stride(0),
        out.stride(0),
        out.stride(1),
        num_heads,
        max_parts,
        GROUP=group,
        GROUP_PAD=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        PARTITION=partition,
        BLOCK_N=min(64, partition),
        SPLIT=split,
        NEW_TOKEN=new is not None,
        HAS_NORM=norm_w[0] is not None,
        DOT_PRECISION=dot_precision(q),
        num_warps=4,
        num_stages=2,
        **pdl_options(),
    )
    if split:
        _paged_decode_reduce_kernel[(batch, num_heads)](
            out,
            part_out,
            part_ml,
            context_lens,
            out.stride(0),
            out.stride(1),
            num_heads,
            max_parts,
            HEAD_DIM=head_dim,
            PARTITION=partition,
            PARTS_CHUNK=min(32, triton.next_power_of_2(max_parts)),
            num_warps=4,
            **pdl_options(),
        )
    return out
