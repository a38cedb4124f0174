"""Fused GPU kernels of the torch engine (Triton), each with a plain torch twin.

Every public function runs its Triton kernel when the tensors live on CUDA and Triton is
importable, and its torch reference otherwise (CPU, tests). All of them are safe inside a CUDA
graph: no host sync, no shape that depends on tensor values, outputs allocated by torch (which
takes them from the graph's private pool during capture).

KV-cache layout (fixed for the engine): per layer `k_cache`, `v_cache` of shape
[num_blocks, block_size, num_kv_heads, head_dim]; `block_tables` int32 [batch, max_blocks];
`context_lens` int32 [batch]; `slot_mapping` int64 [tokens] = block * block_size + offset, -1 for
a padding token that writes nothing. Query head h reads KV head h // (num_heads // num_kv_heads).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from models.engine.streams import private_stream

try:
    import triton
    import triton.language as tl
    from triton.runtime.errors import OutOfResources
except ImportError:  # CPU machines: the torch references below are used instead
    triton = None
    tl = None
    OutOfResources = RuntimeError  # never raised without Triton

HAS_TRITON = triton is not None


def use_triton(t: torch.Tensor) -> bool:
    """Whether the Triton kernels serve this tensor (CUDA tensor and Triton installed)."""
    return HAS_TRITON and t.is_cuda


_pdl: bool | None = None


def pdl_enabled() -> bool:
    """Whether kernels launch with programmatic dependent launch (PDL, Hopper and later):
    each kernel's programs may then be scheduled while the kernel before it drains, and wait
    in `_pdl_start` (griddepcontrol.wait) until its results are visible, which hides most of
    the launch gap between the many small kernels of a decode step. TANDEM_PDL=0 turns it
    off; Triton without `launch_pdl` or an older GPU never use it."""
    global _pdl
    if _pdl is None:
        _pdl = bool(
            HAS_TRITON
            and os.environ.get("TANDEM_PDL", "1") != "0"
            and torch.cuda.is_available()
            and torch.cuda.get_device_capability()[0] >= 9
            and hasattr(getattr(tl.extra, "cuda", None), "gdc_wait")
        )
    return _pdl


def pdl_options() -> dict:
    """Launch keywords of every Triton kernel here: its USE_PDL switch and Triton's launch_pdl."""
    return {"USE_PDL": True, "launch_pdl": True} if pdl_enabled() else {"USE_PDL": False}


def dot_precision(t: torch.Tensor) -> str:
    """Matrix products in full fp32 for fp32 tensors (tf32 would differ from torch's fp32)."""
    return "ieee" if t.dtype == torch.float32 else "tf32"


# ----------------------------------------------------------------------------- torch references


def paged_decode_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Decode attention over a paged KV cache, one query token per row (torch, any device).

    q [B, H, D]; returns [B, H, D] in q's dtype. A row with context length 0 gives zeros.
    """
    batch, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    out = torch.zeros_like(q)
    for b in range(batch):
        n = int(context_lens[b])
        if n == 0:
            continue
        pos = torch.arange(n, device=q.device)
        blocks = block_tables[b, pos // block_size].long()
        k = k_cache[blocks, pos % block_size].float()  # [n, KVH, D]
        v = v_cache[blocks, pos % block_size].float()
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,nhd->hn", q[b].float(), k) * scale
        out[b] = torch.einsum("hn,nhd->hd", scores.softmax(-1), v).to(q.dtype)
    return out


def rms_norm_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    steer: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """RMSNorm with optional fused residual add and per-row steering add (torch).

    With `residual`: h = x + residual (+ steer), residual is overwritten with h, and the norm of
    h is returned with it. Rounding follows Hugging Face's Qwen3/Llama RMSNorm: the sum is
    rounded to x's dtype before the norm, the normalized value before the weight multiply.
    """
    if residual is not None:
        h = x + residual
        if steer is not None:
            h = h + steer
        residual.copy_(h)
        x = h
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * y.to(x.dtype), residual


def qk_norm_rope_store_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    q_norm_weight: torch.Tensor | None,
    k_norm_weight: torch.Tensor | None,
    eps: float,
    k_cache: torch.Tensor | None,
    v_cache: torch.Tensor | None,
    slot_mapping: torch.Tensor | None,
) -> None:
    """Per-head RMSNorm of q and k (Qwen3; skipped when the weight is None), neox RoPE on both,
    in place, then k and v written into the paged cache at `slot_mapping` (torch).

    q [T, H, D], k and v [T, KVH, D] (views may be strided); cos/sin [max_pos, D/2] float32.
    """
    half = q.shape[-1] // 2
    c = cos[positions.long()][:, None, :]
    s = sin[positions.long()][:, None, :]
    for x, w in ((q, q_norm_weight), (k, k_norm_weight)):
        y = x
        if w is not None:
            y, _ = rms_norm_ref(x, w, eps)
        y = y.float()
        y1, y2 = y[..., :half], y[..., half:]
        x.copy_(torch.cat([y1 * c - y2 * s, y2 * c + y1 * s], dim=-1))
    if k_cache is not None and slot_mapping is not None:
        store_kv_cache_ref(k, v, k_cache, v_cache, slot_mapping)


def store_kv_cache_ref(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write k, v [T, KVH, D] into the paged cache at slot_mapping; slot -1 writes nothing."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    block_size = k_cache.shape[1]
    blocks, offsets = slots // block_size, slots % block_size
    k_cache[blocks, offsets] = k[keep].to(k_cache.dtype)
    v_cache[blocks, offsets] = v[keep].to(v_cache.dtype)


def silu_and_mul_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up (torch)."""
    return torch.nn.functional.silu(gate) * up


# ----------------------------------------------------------------------------- Triton kernels

if HAS_TRITON:

    @triton.jit
    def _pdl_start(USE_PDL: tl.constexpr):
        """First statement of every kernel: under PDL, wait until the kernels before this one
        have finished and their writes are visible, then let the next kernel's programs be
        scheduled as soon as this one's last programs have started."""
        if USE_PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()

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
        _pdl_start(USE_PDL)
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
        _pdl_start(USE_PDL)
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

    @triton.jit
    def _rms_norm_kernel(
        x_ptr,
        res_ptr,
        steer_ptr,
        w_ptr,
        out_ptr,
        stride_x,
        stride_r,
        stride_s,
        stride_o,
        stride_part,
        n_cols,
        eps,
        HAS_RES: tl.constexpr,
        HAS_STEER: tl.constexpr,
        NUM_PARTS: tl.constexpr,
        BLOCK: tl.constexpr,
        USE_PDL: tl.constexpr,
    ):
        _pdl_start(USE_PDL)
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
        for part in tl.static_range(1, NUM_PARTS):  # split-K partial sums of the producing matmul
            x += tl.load(x_ptr + part * stride_part + row * stride_x + cols, mask=mask, other=0.0)
        dtype = out_ptr.dtype.element_ty
        x = x.to(dtype)
        if HAS_RES:
            h = (
                x.to(tl.float32)
                + tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
            ).to(dtype)
            if HAS_STEER:
                s = tl.load(steer_ptr + row * stride_s + cols, mask=mask, other=0.0)
                h = (h.to(tl.float32) + s.to(tl.float32)).to(dtype)
            tl.store(res_ptr + row * stride_r + cols, h, mask=mask)
            x = h
        xf = x.to(tl.float32)
        var = tl.sum(xf * xf, 0) / n_cols
        y = (xf * tl.math.rsqrt(var + eps)).to(dtype)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0)
        tl.store(
            out_ptr + row * stride_o + cols,
            (w.to(tl.float32) * y.to(tl.float32)).to(dtype),
            mask=mask,
        )

    @triton.jit
    def _qk_norm_rope_store_kernel(
        q_ptr,
        k_ptr,
        v_ptr,
        pos_ptr,
        cos_ptr,
        sin_ptr,
        qw_ptr,
        kw_ptr,
        k_cache_ptr,
        v_cache_ptr,
        slot_ptr,
        stride_qt,
        stride_qh,
        stride_kt,
        stride_kh,
        stride_vt,
        stride_vh,
        stride_cb,
        stride_cs,
        stride_ch,
        stride_cos,
        num_heads,
        eps,
        HALF: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,
        HAS_NORM: tl.constexpr,
        STORE: tl.constexpr,
        USE_PDL: tl.constexpr,
    ):
        _pdl_start(USE_PDL)
        t = tl.program_id(0).to(tl.int64)
        head = tl.program_id(1)
        is_q = head < num_heads
        d = tl.arange(0, HALF)
        pos = tl.load(pos_ptr + t).to(tl.int64)
        c = tl.load(cos_ptr + pos * stride_cos + d)
        s = tl.load(sin_ptr + pos * stride_cos + d)
        if is_q:
            base = q_ptr + t * stride_qt + head * stride_qh
            w_ptr = qw_ptr
        else:
            base = k_ptr + t * stride_kt + (head - num_heads) * stride_kh
            w_ptr = kw_ptr
        x1 = tl.load(base + d)
        x2 = tl.load(base + HALF + d)
        dtype = x1.dtype
        if HAS_NORM:
            f1 = x1.to(tl.float32)
            f2 = x2.to(tl.float32)
            r = tl.math.rsqrt((tl.sum(f1 * f1, 0) + tl.sum(f2 * f2, 0)) / (2 * HALF) + eps)
            x1 = tl.load(w_ptr + d).to(tl.float32) * (f1 * r).to(dtype).to(tl.float32)
            x2 = tl.load(w_ptr + HALF + d).to(tl.float32) * (f2 * r).to(dtype).to(tl.float32)
            x1 = x1.to(dtype)
            x2 = x2.to(dtype)
        y1 = (x1.to(tl.float32) * c - x2.to(tl.float32) * s).to(dtype)
        y2 = (x2.to(tl.float32) * c + x1.to(tl.float32) * s).to(dtype)
        tl.store(base + d, y1)
        tl.store(base + HALF + d, y2)
        if STORE:
            if not is_q:
                slot = tl.load(slot_ptr + t)
                if slot >= 0:
                    kvh = head - num_heads
                    blk = slot // BLOCK_SIZE
                    off = slot % BLOCK_SIZE
                    kc = k_cache_ptr + blk * stride_cb + off * stride_cs + kvh * stride_ch
                    vc = v_cache_ptr + blk * stride_cb + off * stride_cs + kvh * stride_ch
                    tl.store(kc + d, y1)
                    tl.store(kc + HALF + d, y2)
                    vb = v_ptr + t * stride_vt + kvh * stride_vh
                    tl.store(vc + d, tl.load(vb + d))
                    tl.store(vc + HALF + d, tl.load(vb + HALF + d))

    @triton.jit
    def _store_kv_cache_kernel(
        k_ptr,
        v_ptr,
        k_cache_ptr,
        v_cache_ptr,
        slot_ptr,
        stride_kt,
        stride_kh,
        stride_vt,
        stride_vh,
        stride_cb,
        stride_cs,
        stride_ch,
        HEAD_DIM: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,
        USE_PDL: tl.constexpr,
    ):
        _pdl_start(USE_PDL)
        t = tl.program_id(0).to(tl.int64)
        kvh = tl.program_id(1)
        slot = tl.load(slot_ptr + t)
        if slot >= 0:
            d = tl.arange(0, HEAD_DIM)
            dst = (
                (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_cs + kvh * stride_ch
            )
            tl.store(k_cache_ptr + dst + d, tl.load(k_ptr + t * stride_kt + kvh * stride_kh + d))
            tl.store(v_cache_ptr + dst + d, tl.load(v_ptr + t * stride_vt + kvh * stride_vh + d))

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
        _pdl_start(USE_PDL)
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
        _pdl_start(USE_PDL)
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
        _pdl_start(USE_PDL)
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_cols
        g = tl.load(gate_ptr + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(up_ptr + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
        y = g / (1.0 + tl.exp(-g)) * u
        tl.store(out_ptr + row * stride_o + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- public API


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
    saves that launch. Returns [B, H, D] in q's dtype.
    """
    if new_token is not None and not use_triton(q):
        new_token.prepare(q, k_cache, v_cache)
        new_token = None
    if not use_triton(q):
        return paged_decode_attention_ref(q, k_cache, v_cache, block_tables, context_lens, scale)
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


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    steer: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """RMSNorm over the last dim, optionally fused with the residual add and a steering add.

    x [T, N]. With `residual` [T, N]: h = x + residual (+ steer [T, N]) is written back into
    `residual` (the new residual stream) and RMSNorm(h) is returned. Returns (normed, residual).
    With a residual, x may also be float32 split-K partial sums [S, T, N] of the matmul that
    produced it (see `linear_partials`): they are summed and rounded to the residual's dtype.
    """
    parts = 1
    if residual is not None and x.dim() == residual.dim() + 1:
        parts = x.shape[0]
    if not use_triton(x):
        if parts > 1:
            x = x.sum(0).to(residual.dtype)
        return rms_norm_ref(x, weight, eps, residual, steer)
    shape = x.shape[1:] if parts > 1 else x.shape
    n_cols = shape[-1]
    x2 = x.reshape(parts, -1, n_cols)[0] if parts > 1 else x.reshape(-1, n_cols)
    stride_part = x2.shape[0] * n_cols if parts > 1 else 0
    out_dtype = residual.dtype if residual is not None else x.dtype
    out = torch.empty(x2.shape, device=x.device, dtype=out_dtype)
    res2 = residual.view(-1, n_cols) if residual is not None else x2
    steer2 = steer.view(-1, n_cols) if steer is not None else x2
    block = triton.next_power_of_2(n_cols)
    _rms_norm_kernel[(x2.shape[0],)](
        x2,
        res2,
        steer2,
        weight,
        out,
        x2.stride(0),
        res2.stride(0),
        steer2.stride(0),
        out.stride(0),
        stride_part,
        n_cols,
        eps,
        HAS_RES=residual is not None,
        HAS_STEER=steer is not None,
        NUM_PARTS=parts,
        BLOCK=block,
        num_warps=min(16, max(1, block // 256)),
        **pdl_options(),
    )
    return out.view(shape), residual


def qk_norm_rope_store(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    q_norm_weight: torch.Tensor | None = None,
    k_norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    k_cache: torch.Tensor | None = None,
    v_cache: torch.Tensor | None = None,
    slot_mapping: torch.Tensor | None = None,
) -> None:
    """In place: per-head RMSNorm of q and k (when weights are given), neox-style RoPE on both;
    then k and v are written into the paged cache at slot_mapping (when a cache is given).

    q [T, H, D], k and v [T, KVH, D] with unit stride in D (slices of a fused qkv output work);
    positions [T]; cos/sin [max_pos, D/2] float32.
    """
    if not use_triton(q):
        qk_norm_rope_store_ref(
            q,
            k,
            v,
            positions,
            cos,
            sin,
            q_norm_weight,
            k_norm_weight,
            eps,
            k_cache,
            v_cache,
            slot_mapping,
        )
        return
    tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    store = k_cache is not None and slot_mapping is not None
    has_norm = q_norm_weight is not None
    cache = k_cache if store else q
    _qk_norm_rope_store_kernel[(tokens, num_heads + num_kv_heads)](
        q,
        k,
        v,
        positions,
        cos,
        sin,
        q_norm_weight if has_norm else q,
        k_norm_weight if has_norm else q,
        cache,
        v_cache if store else q,
        slot_mapping if store else positions,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        cache.stride(0) if store else 0,
        cache.stride(1) if store else 0,
        cache.stride(2) if store else 0,
        cos.stride(0),
        num_heads,
        eps,
        HALF=head_dim // 2,
        BLOCK_SIZE=k_cache.shape[1] if store else 1,
        HAS_NORM=has_norm,
        STORE=store,
        num_warps=1,
        **pdl_options(),
    )


def store_kv_cache(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write k, v [T, KVH, D] into the paged cache at slot_mapping; slot -1 writes nothing.
    k_cache and v_cache share their strides."""
    if not use_triton(k):
        store_kv_cache_ref(k, v, k_cache, v_cache, slot_mapping)
        return
    tokens, num_kv_heads, head_dim = k.shape
    _store_kv_cache_kernel[(tokens, num_kv_heads)](
        k,
        v,
        k_cache,
        v_cache,
        slot_mapping,
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        HEAD_DIM=head_dim,
        BLOCK_SIZE=k_cache.shape[1],
        num_warps=1,
        **pdl_options(),
    )


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
_linear_choice: dict[tuple, tuple | None] = {}
MAX_SKINNY_ROWS = 32  # more rows than this always use cuBLAS
MIN_TUNED_WEIGHT_BYTES = 4 << 20  # smaller weights always use cuBLAS
MAX_TUNING_COPIES = 64
# LoRA columns (slots x rank) per part that the skinny kernel may carry: every program reads
# all of them, used or not, where `lora_add_` skips a slot no row uses (8 adapters of rank 16)
MAX_FUSED_LORA_COLUMNS = 64
FUSED_LORA = os.environ.get("TANDEM_FUSED_LORA", "1") != "0"  # 0: always linear + lora_add_


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T (+ bias), like F.linear. On CUDA with at most 32 rows (decode), a Triton
    skinny-GEMM kernel serves a shape when it beat cuBLAS there: each (out, in, row bucket) is
    timed once, at its first call outside graph capture (engine warm-up), in CUDA graphs."""
    return _linear(x, weight, bias, partials=False)


def linear_partials(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Like `linear`, but may return float32 split-K partial sums [S, rows, out] (when that was
    fastest for the shape): for a result that only feeds `rms_norm(..., residual)`, which sums
    them, so a small matmul can spread over more of the GPU without a separate reduction."""
    return _linear(x, weight, bias, partials=True)


def silu_mul_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """silu(x @ gate.T) * (x @ up.T) for weight = [gate; up] (a fused gate_up projection
    without bias). On CUDA at decode sizes one skinny kernel computes both halves and the
    product when that beat cuBLAS plus the silu-and-mul kernel (timed like `linear`); else
    exactly those two."""
    return _linear(x, weight, None, partials=False, gated=True)


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora: RowLoRA,
    partials: bool = False,
    gated: bool = False,
) -> torch.Tensor:
    """x @ weight.T (+ bias) plus the per-row LoRA `lora` (see `lora_add_`). partials: may
    return float32 split-K partial sums, as `linear_partials`; gated (weight = [gate; up],
    parts [I, I], no bias): silu(gate) * up, [T, I]. On CUDA at decode sizes the LoRA runs
    inside the skinny GEMM, one launch, where the tuner found that faster than the linear plus
    `lora_add_` (plus silu-and-mul when gated); else exactly those (torch on CPU)."""
    config = _tuned_config(x, weight, bias, partials, gated, lora)
    if config is not None:
        return _skinny_linear(x, weight, bias, config, gated, lora)
    return _lora_linear_unfused(x, weight, bias, lora, partials, gated)


def _lora_linear_unfused(x, weight, bias, lora: RowLoRA, partials: bool, gated: bool):
    y = _linear(x, weight, bias, partials)
    lora.add_(y[0] if y.dim() == 3 else y, x)  # partial sums: the LoRA joins the first
    return silu_and_mul(*y.chunk(2, dim=-1)) if gated else y


def _linear(x, weight, bias, partials: bool, gated: bool = False) -> torch.Tensor:
    config = _tuned_config(x, weight, bias, partials, gated)
    if config is None:
        y = torch.nn.functional.linear(x, weight, bias)
        return silu_and_mul(*y.chunk(2, dim=-1)) if gated else y
    return _skinny_linear(x, weight, bias, config, gated)


def linear_configs(partials: bool = False, gated: bool = False) -> list[tuple]:
    """The skinny configs the tuner times for a call of that kind."""
    if gated:
        return GATED_CONFIGS
    return SKINNY_CONFIGS + (SPLIT_CONFIGS if partials else [])


def _tuned_config(x, weight, bias, partials: bool, gated: bool, lora: RowLoRA | None = None):
    """The skinny config chosen for this shape, or None for cuBLAS (timed at first use). With
    `lora`: the config of the fused kernel, or None for the linear plus `lora_add_`."""
    if not use_triton(x) or x.dim() != 2 or x.shape[0] > MAX_SKINNY_ROWS or x.stride(-1) != 1:
        return None
    if lora is not None and not FUSED_LORA:
        return None
    rows = triton.next_power_of_2(x.shape[0])
    lora_key = lora.key() if lora is not None else None
    key = (weight.shape[0], weight.shape[1], rows, x.dtype, partials, gated, lora_key)
    if key not in _linear_choice:
        if torch.cuda.is_current_stream_capturing():
            return None
        shipped = _shipped_choices(x.device)
        if _table_key(key) in shipped:  # chosen on this GPU model before: no timing
            value = shipped[_table_key(key)]
            _linear_choice[key] = tuple(value) if value is not None else None
            return _linear_choice[key]
        if lora is None:
            configs = linear_configs(partials, gated)
        else:
            configs = fused_lora_configs(weight, bias, lora, partials, gated)
            if configs:  # the unfused path it competes with picks its own config first
                _tuned_config(x, weight, bias, partials, False)
        _linear_choice[key] = _pick_linear(x, weight, bias, configs, gated, lora, partials)
    return _linear_choice[key]


TUNED_DIR = Path(__file__).with_name("tuned")  # shipped tuner choices: <GPU name>.json


def _table_key(key: tuple) -> str:
    """A tuner key as the shipped tables spell it, e.g. "4096x2048 rows=16 bfloat16
    partials=0 gated=0" (+ " lora=2048+1024+1024/1x16": part sizes / slots x rank)."""
    out, inp, rows, dtype, partials, gated, lora_key = key
    text = f"{out}x{inp} rows={rows} {str(dtype).removeprefix('torch.')} "
    text += f"partials={int(partials)} gated={int(gated)}"
    if lora_key is not None:
        parts, slots, rank = lora_key
        text += f" lora={'+'.join(map(str, parts))}/{slots}x{rank}"
    return text


_shipped: dict[str, dict[str, list | None]] = {}


def _shipped_choices(device: torch.device) -> dict[str, list | None]:
    """The choices shipped for this GPU model (models/engine/tuned/<name>.json, written from
    `tuning_table()` by the GPU benchmarks), so a cold start compiles only the chosen kernels
    instead of timing every candidate. TANDEM_RETUNE=1 ignores them."""
    name = torch.cuda.get_device_name(device)
    if name not in _shipped:
        file = TUNED_DIR / f"{tuning_file_stem(name)}.json"
        retune = os.environ.get("TANDEM_RETUNE", "0") != "0"
        loaded = json.loads(file.read_text())["choices"] if file.exists() and not retune else {}
        _shipped[name] = loaded
    return _shipped[name]


def tuning_file_stem(device_name: str) -> str:
    """"NVIDIA H200" -> "NVIDIA_H200"."""
    return "".join(c if c.isalnum() else "_" for c in device_name)


def tuning_table() -> dict[str, list | None]:
    """Every choice the tuner made in this process, keyed as the shipped tables are."""
    return {
        _table_key(key): list(value) if value is not None else None
        for key, value in sorted(_linear_choice.items(), key=lambda kv: str(kv[0]))
    }


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


def _skinny_linear(x, weight, bias, config, gated: bool = False, lora: RowLoRA | None = None):
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


def _pick_linear(
    x,
    weight,
    bias,
    configs: list[tuple],
    gated: bool = False,
    lora: RowLoRA | None = None,
    partials: bool = False,
) -> tuple | None:
    """The fastest skinny config for this shape, or None when cuBLAS is faster (with `lora`:
    the fastest fused config, or None when the linear plus `lora_add_` is faster)."""
    if weight.stride(-1) != 1 or weight.shape[1] % 16 or not configs:
        return None
    nbytes = weight.numel() * weight.element_size()
    if nbytes < MIN_TUNED_WEIGHT_BYTES:  # launch-bound and L2-resident: nothing to win
        return None
    times = time_linear_configs(x.shape[0], weight, bias, configs, gated, lora, partials)
    best, best_ms = None, times.pop(None)
    for config, ms in times.items():
        if ms < best_ms * 0.97:
            best, best_ms = config, ms
    return best


_tuning_streams: dict[int, torch.cuda.Stream] = {}


def _tuning_stream(device: torch.device) -> torch.cuda.Stream:
    """The tuner's own capture stream: its short-lived graphs never share a cuBLAS workspace
    with an engine's graphs (see models.engine.streams)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _tuning_streams:
        _tuning_streams[index] = private_stream(device)
    return _tuning_streams[index]


def time_linear_configs(
    rows: int,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    configs: list[tuple],
    gated: bool = False,
    lora: RowLoRA | None = None,
    partials: bool = False,
) -> dict[tuple | None, float]:
    """Milliseconds per call of x[rows] @ weight.T for cuBLAS (key None) and each skinny
    config (gated: `silu_mul_linear`, against cuBLAS plus the silu-and-mul kernel). Timed in a
    CUDA graph over enough weight copies that they stream from HBM as in a real step, not
    from L2. With `lora` (only its tensors and shape count: every odd row takes one slot),
    `lora_linear`: key None is the unfused path (the linear's own tuned choice, `partials`
    telling which, plus `lora_add_`), the configs are timed as fused kernels."""
    nbytes = weight.numel() * weight.element_size()
    rows = triton.next_power_of_2(rows)
    probe = torch.randn(rows, weight.shape[1], device=weight.device, dtype=weight.dtype)
    # enough copies to stream from HBM as in a real step; capped, since each is a graph launch
    copies = min(MAX_TUNING_COPIES, max(2, -(-(192 << 20) // nbytes)))
    weights = [weight] + [weight.clone() for _ in range(copies - 1)]
    loras: list[RowLoRA | None] = [None] * copies
    if lora is not None:  # each weight copy with its own copy of A and B
        mix = torch.zeros(rows, lora.num_slots, device=weight.device, dtype=lora.row_weights.dtype)
        odd = torch.arange(1, rows, 2, device=weight.device)
        mix[odd, (odd // 2) % lora.num_slots] = 1.0  # base and adapter rows side by side
        token_rows = torch.arange(rows, device=weight.device)
        a, b = lora.lora_a, lora.lora_b
        loras = [RowLoRA(a, b, mix, token_rows, lora.part_sizes, lora.rank)] + [
            RowLoRA(a.clone(), b.clone(), mix, token_rows, lora.part_sizes, lora.rank)
            for _ in range(copies - 1)
        ]

    def graph_ms(fn) -> float:
        for w, rl in zip(weights, loras, strict=True):
            fn(w, rl)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=_tuning_stream(weight.device)):
            for w, rl in zip(weights, loras, strict=True):
                fn(w, rl)
        graph.replay()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(5):
            graph.replay()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / (5 * len(weights))

    def baseline(w: torch.Tensor, rl: RowLoRA | None) -> torch.Tensor:
        if rl is not None:
            return _lora_linear_unfused(probe, w, bias, rl, partials, gated)
        y = torch.nn.functional.linear(probe, w, bias)
        return silu_and_mul(*y.chunk(2, dim=-1)) if gated else y

    times: dict[tuple | None, float] = {None: graph_ms(baseline)}
    for config in configs:
        try:
            times[config] = graph_ms(
                lambda w, rl, c=config: _skinny_linear(probe, w, bias, c, gated, rl)
            )
        except OutOfResources:  # e.g. float32 tiles past shared memory: not a candidate here
            continue
    return times

