"""RMSNorm (fused with the residual and steering adds), per-head q/k norm with RoPE and the
KV-cache write, and the plain KV-cache write: Triton kernels, their wrappers and torch
references.
"""

from __future__ import annotations

import torch

from models.engine.kernels.launch import HAS_TRITON, pdl_options, tl, triton, use_triton


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


if HAS_TRITON:
    from models.engine.kernels.launch import pdl_start

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
        pdl_start(USE_PDL)
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
        pdl_start(USE_PDL)
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
        pdl_start(USE_PDL)
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
    k_cache and v_cache share their strides. Triton on CUDA only: `store_kv_cache_ref` is the
    torch form (models.engine.attention picks)."""
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
