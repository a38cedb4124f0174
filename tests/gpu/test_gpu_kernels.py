"""The engine's fused kernels: torch references checked against plain math on CPU, Triton kernels
checked against the references on CUDA (marked gpu, skipped without one)."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torch.nn.functional as F

from models.engine.cuda_graph import CudaGraphRunner
from models.engine.kernels import tuning
from models.engine.kernels.decode_attention import (
    MAX_DECODE_PROGRAMS,
    NewToken,
    decode_partition_size,
    paged_decode_attention,
    paged_decode_attention_ref,
)
from models.engine.kernels.launch import HAS_TRITON, OutOfResources
from models.engine.kernels.linear import linear, linear_partials, lora_linear, silu_mul_linear
from models.engine.kernels.lora import RowLoRA, lora_add_, lora_add_ref
from models.engine.kernels.norm_rope import (
    qk_norm_rope_store,
    qk_norm_rope_store_ref,
    rms_norm,
    rms_norm_ref,
    store_kv_cache,
    store_kv_cache_ref,
)
from models.engine.kernels.skinny_gemm import (
    GATED_CONFIGS,
    SKINNY_CONFIGS,
    SPLIT_CONFIGS,
    fused_lora_configs,
    silu_and_mul,
    silu_and_mul_ref,
    skinny_linear,
)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
triton_cuda = pytest.mark.skipif(
    not (torch.cuda.is_available() and HAS_TRITON), reason="needs CUDA and Triton"
)


@contextlib.contextmanager
def linear_choices(choices: dict):
    """Force the skinny-GEMM tuner's choices for some shapes (keys of tuning._linear_choice)
    while the block runs; what was there before comes back afterwards."""
    saved = {key: tuning._linear_choice[key] for key in choices if key in tuning._linear_choice}
    tuning._linear_choice.update(choices)
    try:
        yield
    finally:
        for key in choices:
            tuning._linear_choice.pop(key, None)
        tuning._linear_choice.update(saved)


def paged_cache(context_lens, num_kv_heads, head_dim, block_size, dtype, device, seed=0):
    """A random paged cache with shuffled blocks, its block tables, and each row's dense k/v."""
    gen = torch.Generator().manual_seed(seed)
    max_blocks = max(1, max(math.ceil(n / block_size) for n in context_lens))
    num_blocks = 1 + len(context_lens) * max_blocks
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen).to(
        device, dtype
    )
    v_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen).to(
        device, dtype
    )
    order = (torch.randperm(num_blocks - 1, generator=gen) + 1).view(len(context_lens), max_blocks)
    block_tables = order.to(device=device, dtype=torch.int32)
    dense = []
    for row, n in enumerate(context_lens):
        blocks = block_tables[row].long()
        dense.append((k_cache[blocks].flatten(0, 1)[:n], v_cache[blocks].flatten(0, 1)[:n]))
    lens = torch.tensor(context_lens, dtype=torch.int32, device=device)
    return k_cache, v_cache, block_tables, lens, dense


def test_paged_attention_reference_matches_dense_sdpa():
    lens = [1, 17, 40]
    heads, kv_heads, dim = 8, 2, 16
    k_cache, v_cache, tables, ctx, dense = paged_cache(lens, kv_heads, dim, 4, torch.float32, "cpu")
    q = torch.randn(len(lens), heads, dim)
    out = paged_decode_attention_ref(q, k_cache, v_cache, tables, ctx, dim**-0.5)
    for row, (k, v) in enumerate(dense):
        k = k.transpose(0, 1).repeat_interleave(heads // kv_heads, 0)
        v = v.transpose(0, 1).repeat_interleave(heads // kv_heads, 0)
        want = F.scaled_dot_product_attention(q[row][:, None], k, v)[:, 0]
        torch.testing.assert_close(out[row], want, atol=1e-5, rtol=1e-5)


def test_rms_norm_reference_matches_hf_and_updates_residual():
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

    hf = Qwen3RMSNorm(32, eps=1e-6)
    hf.weight.data = torch.randn(32)
    x, res, steer = torch.randn(5, 32), torch.randn(5, 32), torch.randn(5, 32)
    want_h = x + res + steer
    out, new_res = rms_norm(x, hf.weight.data, 1e-6, residual=res.clone(), steer=steer)
    torch.testing.assert_close(new_res, want_h)
    torch.testing.assert_close(out, hf(want_h))


def test_qk_norm_rope_reference_matches_hf_qwen3():
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm, apply_rotary_pos_emb

    tokens, heads, kv_heads, dim = 6, 4, 2, 16
    positions = torch.tensor([0, 3, 5, 9, 10, 31])
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))
    freqs = torch.arange(64).float()[:, None] * inv_freq[None]
    cos, sin = freqs.cos(), freqs.sin()
    q, k, v = (
        torch.randn(tokens, heads, dim),
        torch.randn(tokens, kv_heads, dim),
        torch.randn(tokens, kv_heads, dim),
    )
    qn, kn = Qwen3RMSNorm(dim), Qwen3RMSNorm(dim)
    qn.weight.data, kn.weight.data = torch.randn(dim), torch.randn(dim)
    full_cos = torch.cat([cos, cos], -1)[positions][None]
    full_sin = torch.cat([sin, sin], -1)[positions][None]
    want_q, want_k = apply_rotary_pos_emb(
        qn(q).transpose(0, 1)[None], kn(k).transpose(0, 1)[None], full_cos, full_sin
    )
    k_cache = torch.zeros(4, 8, kv_heads, dim)
    v_cache = torch.zeros(4, 8, kv_heads, dim)
    slots = torch.tensor([8, 9, 10, -1, 16, 17])
    qk_norm_rope_store(
        q, k, v, positions, cos, sin, qn.weight.data, kn.weight.data, 1e-6, k_cache, v_cache, slots
    )
    torch.testing.assert_close(q, want_q[0].transpose(0, 1))
    torch.testing.assert_close(k, want_k[0].transpose(0, 1))
    torch.testing.assert_close(k_cache[1, 1], k[1])
    torch.testing.assert_close(v_cache[2, 1], v[5])
    assert k_cache[1, 3].abs().sum() == 0  # slot -1 wrote nothing


def test_decode_partitions_keep_the_attention_grid_small():
    size = decode_partition_size
    assert size(1, 8, 784) == 64 and size(32, 8, 784) == 128  # short contexts: many partitions
    for batch, ctx in [(1, 40960), (32, 16384), (128, 40960), (256, 131072)]:
        part = size(batch, 8, ctx)
        assert batch * 8 * -(-ctx // part) <= MAX_DECODE_PROGRAMS or part >= ctx
        assert part & (part - 1) == 0  # a power of two


def test_graph_runner_picks_the_smallest_bucket_that_fits():
    runner = CudaGraphRunner(lambda views: views["x"], {"x": torch.zeros(8, 2)}, [4, 1, 8, 2])
    assert [runner.bucket_for(n) for n in (1, 2, 3, 5, 8, 9)] == [1, 2, 4, 8, 8, None]
    with pytest.raises(ValueError, match="fewer than 16 rows"):
        CudaGraphRunner(lambda views: views["x"], {"x": torch.zeros(8, 2)}, [16])


@triton_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("heads,kv_heads", [(16, 8), (32, 8), (8, 8), (14, 2)])
@pytest.mark.parametrize(
    "lens,partition",
    [([1, 5, 16, 17], None), ([700, 0, 2000, 33], None), ([3000, 511, 1], 128), ([64], 512)],
)
def test_triton_paged_attention_matches_reference(heads, kv_heads, lens, partition):
    dim, block = 128, 16
    k_cache, v_cache, tables, ctx, _ = paged_cache(
        lens, kv_heads, dim, block, torch.bfloat16, "cuda"
    )
    q = torch.randn(len(lens), heads, dim, device="cuda", dtype=torch.bfloat16)
    got = paged_decode_attention(q, k_cache, v_cache, tables, ctx, dim**-0.5, partition)
    want = paged_decode_attention_ref(q, k_cache, v_cache, tables, ctx, dim**-0.5)
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)
    assert torch.isfinite(got).all()


@triton_cuda
@pytest.mark.gpu
def test_triton_paged_attention_replays_in_a_cuda_graph_with_new_contexts():
    dim, heads, kv_heads, block = 128, 16, 8, 16
    k_cache, v_cache, tables, ctx, _ = paged_cache(
        [300, 900], kv_heads, dim, block, torch.bfloat16, "cuda"
    )
    q = torch.randn(2, heads, dim, device="cuda", dtype=torch.bfloat16)
    runner = CudaGraphRunner(
        lambda b: paged_decode_attention(
            b["q"], k_cache, v_cache, b["tables"], b["ctx"], 0.1
        ),
        {"q": q.clone(), "tables": tables.clone(), "ctx": ctx.clone()},
        [1, 2],
    )
    runner.capture()
    for lens in ([5, 17], [900, 1], [640, 320]):
        new_ctx = torch.tensor(lens, dtype=torch.int32, device="cuda")
        new_q = torch.randn_like(q)
        got = runner.run({"q": new_q, "tables": tables.flip(0), "ctx": new_ctx}).clone()
        want = paged_decode_attention_ref(
            new_q, k_cache, v_cache, tables.flip(0), new_ctx, 0.1
        )
        torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)
    one = runner.run({"q": q[:1], "tables": tables[:1], "ctx": ctx[:1]})
    want = paged_decode_attention_ref(q[:1], k_cache, v_cache, tables[:1], ctx[:1], 0.1)
    torch.testing.assert_close(one.float(), want.float(), atol=2e-2, rtol=2e-2)


@triton_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("with_residual", [False, True])
def test_triton_rms_norm_matches_reference(with_residual):
    x = torch.randn(7, 2048, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(2048, device="cuda", dtype=torch.bfloat16)
    res = torch.randn_like(x) if with_residual else None
    steer = torch.randn_like(x) if with_residual else None
    got, got_res = rms_norm(x, w, 1e-6, res.clone() if res is not None else None, steer)
    want, want_res = rms_norm_ref(
        x, w, 1e-6, res.clone() if res is not None else None, steer
    )
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
    if with_residual:
        torch.testing.assert_close(got_res, want_res, atol=2e-2, rtol=2e-2)


@triton_cuda
@pytest.mark.gpu
def test_triton_qk_norm_rope_store_matches_reference():
    tokens, heads, kv_heads, dim = 9, 16, 8, 128
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, device="cuda", dtype=torch.bfloat16)
    positions = torch.randint(0, 500, (tokens,), device="cuda")
    freqs = (
        torch.arange(512, device="cuda").float()[:, None]
        * (1e6 ** (-torch.arange(0, dim, 2, device="cuda").float() / dim))[None]
    )
    cos_full = torch.cat([freqs.cos(), freqs.cos()], -1)  # the engine's [max_pos, D] layout
    sin_full = torch.cat([freqs.sin(), freqs.sin()], -1)
    qw = torch.randn(dim, device="cuda", dtype=torch.bfloat16)
    kw = torch.randn(dim, device="cuda", dtype=torch.bfloat16)
    slots = torch.randperm(64, device="cuda")[:tokens]
    slots[2] = -1
    results = []
    for fn in (qk_norm_rope_store, qk_norm_rope_store_ref):
        buf = qkv.clone()
        q, k, v = buf.split([heads * dim, kv_heads * dim, kv_heads * dim], -1)
        q, k, v = (
            q.view(tokens, heads, dim),
            k.view(tokens, kv_heads, dim),
            v.view(tokens, kv_heads, dim),
        )
        kc = torch.zeros(4, 16, kv_heads, dim, device="cuda", dtype=torch.bfloat16)
        vc = torch.zeros_like(kc)
        fn(
            q,
            k,
            v,
            positions,
            cos_full[:, : dim // 2],
            sin_full[:, : dim // 2],
            qw,
            kw,
            1e-6,
            kc,
            vc,
            slots,
        )
        results.append((buf, kc, vc))
    for got, want in zip(results[0], results[1], strict=True):
        torch.testing.assert_close(got.float(), want.float(), atol=3e-2, rtol=2e-2)


@triton_cuda
@pytest.mark.gpu
def test_triton_store_kv_and_silu_and_mul_match_reference():
    k = torch.randn(5, 8, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    slots = torch.tensor([3, 40, -1, 17, 63], device="cuda")
    caches = [torch.zeros(4, 16, 8, 128, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
    store_kv_cache(k, v, caches[0], caches[1], slots)
    store_kv_cache_ref(k, v, caches[2], caches[3], slots)
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])
    gate_up = torch.randn(6, 2 * 6144, device="cuda", dtype=torch.bfloat16)
    gate, up = gate_up.chunk(2, -1)
    torch.testing.assert_close(
        silu_and_mul(gate, up), silu_and_mul_ref(gate, up), atol=2e-2, rtol=2e-2
    )


@triton_cuda
@pytest.mark.gpu
@pytest.mark.parametrize(
    "tokens,k_dim,parts,rank",
    [(1, 2048, [2048, 1024, 1024], 16), (32, 6144, [2048], 16), (40, 2048, [6144, 6144], 16),
     (7, 64, [64, 32, 32], 8)],
)  # fmt: skip
def test_triton_lora_add_matches_reference(tokens, k_dim, parts, rank):
    slots, out = 8, sum(parts)
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(tokens, k_dim, device="cuda", dtype=torch.bfloat16, generator=gen)
    a = torch.randn(k_dim, slots * len(parts) * rank, device="cuda", generator=gen) * 0.05
    b = torch.randn(slots * len(parts) * rank, out, device="cuda", generator=gen) * 0.05
    for slot in range(slots):  # block layout: part p of a slot only maps into part p's columns
        for p in range(len(parts)):
            col = (slot * len(parts) + p) * rank
            lo, hi = sum(parts[:p]), sum(parts[: p + 1])
            b[col : col + rank, :lo] = 0
            b[col : col + rank, hi:] = 0
    a, b = a.to(torch.bfloat16), b.to(torch.bfloat16)
    rows = torch.arange(tokens, device="cuda") // 2
    weights = torch.zeros(int(rows.max()) + 1, slots, device="cuda", dtype=torch.bfloat16)
    weights[1:, 3] = 1.0
    weights[2::2, 5] = 0.5  # a router mix of two adapters
    y = torch.randn(tokens, out, device="cuda", dtype=torch.bfloat16, generator=gen)
    got = lora_add_(y.clone(), x, a, b, weights, rows, parts, rank)
    want = lora_add_ref(y.float(), x.float(), a.float(), b.float(), weights.float(), rows,
                                len(parts), rank)  # fmt: skip
    torch.testing.assert_close(got.float(), want, atol=3e-2, rtol=3e-2)
    assert torch.equal(got[:2], y[:2])  # row 0 uses no adapter: its outputs are untouched


@triton_cuda
@pytest.mark.gpu
@pytest.mark.parametrize(
    "rows,dtype", [(1, torch.bfloat16), (5, torch.bfloat16), (16, torch.float32), (29, torch.bfloat16)]
)
def test_skinny_linear_matches_cublas_for_every_config(rows, dtype):
    x = torch.randn(rows, 2048, device="cuda", dtype=dtype)
    w = torch.randn(1000, 2048, device="cuda", dtype=dtype) * 0.02
    bias = torch.randn(1000, device="cuda", dtype=dtype)
    want = torch.nn.functional.linear(x.float(), w.float(), bias.float())
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=3e-2, rtol=2e-2)
    for config in SKINNY_CONFIGS:
        try:
            got = skinny_linear(x, w, bias, config)
        except OutOfResources:  # 32-row tiles of the widest configs: the tuner skips
            assert rows > 16
            continue
        torch.testing.assert_close(got.float(), want, **tol)
    torch.testing.assert_close(linear(x, w, bias).float(), want, **tol)


@triton_cuda
@pytest.mark.gpu
@pytest.mark.parametrize(
    "rows,dtype", [(1, torch.bfloat16), (3, torch.bfloat16), (16, torch.float32), (32, torch.bfloat16)]
)
def test_gated_skinny_linear_is_silu_of_gate_times_up(rows, dtype):
    """The gate_up projection and silu(gate) * up in one kernel, every config, against the
    unfused path (which rounds the projection to the dtype first, as the kernel does)."""
    inter = 1536
    x = torch.randn(rows, 1024, device="cuda", dtype=dtype)
    w = torch.randn(2 * inter, 1024, device="cuda", dtype=dtype) * 0.05
    y = torch.nn.functional.linear(x, w)
    want = silu_and_mul_ref(y[:, :inter].float(), y[:, inter:].float())
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=3e-2, rtol=2e-2)
    ran = 0
    for config in GATED_CONFIGS:
        try:
            got = skinny_linear(x, w, None, config, gated=True)
        except OutOfResources:  # float32 or 32-row tiles of the widest configs
            assert dtype == torch.float32 or rows > 16
            continue
        ran += 1
        assert got.shape == (rows, inter)
        torch.testing.assert_close(got.float(), want, **tol)
    assert ran >= len(GATED_CONFIGS) // 2
    torch.testing.assert_close(silu_mul_linear(x, w).float(), want, **tol)
    assert want.abs().max() > 0.1


@triton_cuda
@pytest.mark.gpu
def test_triton_kernels_are_exact_enough_in_float32():
    lens = [50, 7]
    k_cache, v_cache, tables, ctx, _ = paged_cache(lens, 2, 32, 4, torch.float32, "cuda")
    q = torch.randn(2, 4, 32, device="cuda")
    got = paged_decode_attention(q, k_cache, v_cache, tables, ctx, 0.2, 16)
    want = paged_decode_attention_ref(q, k_cache, v_cache, tables, ctx, 0.2)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@triton_cuda
@pytest.mark.gpu
def test_split_k_partial_sums_feed_the_fused_residual_norm():
    x = torch.randn(3, 2048, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(2048, 2048, device="cuda", dtype=torch.bfloat16) * 0.02
    norm_w = torch.randn(2048, device="cuda", dtype=torch.bfloat16)
    res = torch.randn(3, 2048, device="cuda", dtype=torch.bfloat16)
    full = torch.nn.functional.linear(x, w)
    want, want_res = rms_norm_ref(full, norm_w, 1e-6, res.clone())
    for config in SPLIT_CONFIGS:
        parts = skinny_linear(x, w, None, config)
        assert parts.shape == (config[-1], 3, 2048) and parts.dtype == torch.float32
        torch.testing.assert_close(parts.sum(0), full.float(), atol=2e-2, rtol=2e-2)
        got, got_res = rms_norm(parts, norm_w, 1e-6, res.clone())
        torch.testing.assert_close(got_res.float(), want_res.float(), atol=3e-2, rtol=2e-2)
        torch.testing.assert_close(got.float(), want.float(), atol=6e-2, rtol=3e-2)
    out = linear_partials(x, w)
    summed = out.sum(0) if out.dim() == 3 else out.float()
    torch.testing.assert_close(summed.float(), full.float(), atol=2e-2, rtol=2e-2)


@triton_cuda
@pytest.mark.gpu
def test_graphs_that_may_replay_at_once_never_share_a_capture_stream():
    # cuBLAS keys its workspace by stream and a graph bakes in its capture stream's workspace:
    # two graphs on one stream replayed concurrently (big and small model) hung the GPU
    from models.engine.streams import private_stream

    def runner():
        buf = {"x": torch.randn(4, 256, device="cuda")}
        w = torch.randn(256, 256, device="cuda")
        r = CudaGraphRunner(lambda v: v["x"] @ w, buf, [4])
        r.capture()
        return r

    a, b = runner(), runner()
    streams = {a.stream.cuda_stream, b.stream.cuda_stream, private_stream().cuda_stream}
    assert len(streams) == 3
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    for _ in range(50):  # replay both at once, as colocated steering does
        a.replay(4)
        with torch.cuda.stream(side):
            b.replay(4)
    torch.cuda.synchronize()
    torch.testing.assert_close(a.outputs[4], a.step(a.views(4)))


@triton_cuda
@pytest.mark.gpu
def test_lora_rows_add_into_split_k_partials():
    from models.engine.attention import ForwardBatch
    from models.engine.lora import LinearWithLoRA

    layer = LinearWithLoRA(2048, [2048], False).cuda().to(torch.bfloat16)
    layer.weight.normal_(0, 0.02)
    layer.allocate_lora(num_slots=2, rank=8)
    gen = torch.Generator().manual_seed(0)
    layer.set_slot(
        1, 0, torch.randn(8, 2048, generator=gen), torch.randn(2048, 8, generator=gen), 0.5
    )
    x = torch.randn(3, 2048, device="cuda", dtype=torch.bfloat16)
    weights = torch.tensor(
        [[0.0, 0.0], [0.0, 1.0], [0.0, 0.5]], device="cuda", dtype=torch.bfloat16
    )
    batch = ForwardBatch(
        is_decode=True, slot_mapping=torch.zeros(3, dtype=torch.long, device="cuda"),
        block_tables=torch.zeros(3, 1, dtype=torch.int32, device="cuda"),
        context_lens=torch.ones(3, dtype=torch.int32, device="cuda"), query_lens=[1, 1, 1],
        token_rows=torch.arange(3, device="cuda"), lora_weights=weights,
    )  # fmt: skip
    # (out, in, rows, dtype, partials, gated, LoRA): the plain matmul's split, LoRA unfused
    key = (2048, 2048, 4, torch.bfloat16, True, False, None)
    unfused = {key[:-1] + (layer.row_lora(batch).key(),): None}
    with linear_choices({key[:4] + (False, False, layer.row_lora(batch).key()): None}):
        want = layer.forward(x, batch).float()
    for config in SPLIT_CONFIGS:
        with linear_choices({key: config, **unfused}):
            got = layer.forward_partials(x, batch)
        assert got.dim() == 3
        torch.testing.assert_close(got.sum(0), want, atol=3e-2, rtol=2e-2)


@triton_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("qk_norm", [True, False])
@pytest.mark.parametrize("heads,kv_heads,partition", [(16, 8, None), (16, 8, 64), (14, 2, 16)])
def test_decode_attention_finishes_the_raw_new_token_like_the_two_kernel_path(
    qk_norm, heads, kv_heads, partition
):
    """Attention given the raw new token (q/k norm, RoPE and the cache write inside the kernel)
    against qk_norm_rope_store then attention: same output, same cache, q left raw. Contexts
    put the new token alone in a fresh partition (65), mid-partition, in the only one; row 3 is
    a padding row (context 0) whose stale slot must not be written."""
    dim, block = 128, 16
    lens = [65, 700, 3, 0]
    k_cache, v_cache, tables, ctx, _ = paged_cache(lens, kv_heads, dim, block, torch.bfloat16, "cuda")
    rows = len(lens)
    qkv = torch.randn(rows, (heads + 2 * kv_heads) * dim, device="cuda", dtype=torch.bfloat16)
    positions = (ctx - 1).clamp(min=0).long()
    slots = torch.stack([tables[r, p // block].long() * block + p % block
                         for r, p in enumerate(positions.tolist())])  # fmt: skip
    freqs = torch.arange(2048, device="cuda").float()[:, None] * (
        1e6 ** (-torch.arange(0, dim, 2, device="cuda").float() / dim)
    )[None]
    cos, sin = freqs.cos(), freqs.sin()
    qw = torch.randn(dim, device="cuda", dtype=torch.bfloat16) if qk_norm else None
    kw = torch.randn(dim, device="cuda", dtype=torch.bfloat16) if qk_norm else None
    split = [heads * dim, kv_heads * dim, kv_heads * dim]

    def run(fused: bool):
        buf, kc, vc = qkv.clone(), k_cache.clone(), v_cache.clone()
        q, k, v = buf.split(split, -1)
        q = q.view(rows, heads, dim)
        cells = slots.clone()
        if not fused:
            cells[3] = -1  # the two-kernel path writes any slot it is given
        new = NewToken(k.view(rows, kv_heads, dim), v.view(rows, kv_heads, dim),
                               positions, cos, sin, qw, kw, 1e-6, cells)  # fmt: skip
        if fused:
            out = paged_decode_attention(q, kc, vc, tables, ctx, dim**-0.5, partition, new)
        else:
            new.prepare(q, kc, vc)
            out = paged_decode_attention(q, kc, vc, tables, ctx, dim**-0.5, partition)
        return out, kc, vc, buf

    out, kc, vc, buf = run(fused=True)
    want, want_kc, want_vc, _ = run(fused=False)
    torch.testing.assert_close(out[:3].float(), want[:3].float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(kc.float(), want_kc.float(), atol=2e-2, rtol=2e-2)
    assert torch.equal(vc, want_vc)
    assert not torch.equal(kc, k_cache)  # the new keys were written
    padding = tables[3, 0].long() * block  # the padding row's stale slot
    assert torch.equal(kc.flatten(0, 1)[padding], k_cache.flatten(0, 1)[padding])
    assert torch.equal(buf, qkv)  # q, k and v stay raw


def random_lora(k_dim, parts, slots, rank, tokens, dtype=torch.bfloat16, seed=0):
    """A RowLoRA of `slots` random adapters in the engine's block layout, `tokens` tokens over
    four rows: a one-hot row, a router mix of two adapters, another one-hot row at weight 0.7,
    and row 0 on no adapter (base: every fourth token)."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    width = slots * len(parts) * rank
    a = torch.randn(k_dim, width, device="cuda", generator=gen) * 0.05
    b = torch.randn(width, sum(parts), device="cuda", generator=gen) * 0.05
    for slot in range(slots):  # part p of a slot only maps into part p's columns
        for p in range(len(parts)):
            col = (slot * len(parts) + p) * rank
            b[col : col + rank, : sum(parts[:p])] = 0
            b[col : col + rank, sum(parts[: p + 1]) :] = 0
    token_rows = (torch.arange(tokens, device="cuda") + 1) % 4
    weights = torch.zeros(4, slots, device="cuda")
    weights[1, 0] = 1.0
    weights[2, 0] += 0.5
    weights[2, slots - 1] += 0.5
    weights[3, slots - 1] = 0.7
    return RowLoRA(a.to(dtype), b.to(dtype), weights.to(dtype), token_rows, parts, rank)


def lora_linear_ref(x, weight, bias, lora, gated=False):
    """linear + `lora_add_ref` (+ silu(gate) * up), in float32."""
    f = lambda t: t.float() if t is not None else None  # noqa: E731
    y = F.linear(f(x), f(weight), f(bias))
    lora_add_ref(y, f(x), f(lora.lora_a), f(lora.lora_b), f(lora.row_weights),
                         lora.token_rows, len(lora.part_sizes), lora.rank)  # fmt: skip
    return silu_and_mul_ref(*y.chunk(2, -1)) if gated else y


@triton_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 2, 16, 32])
@pytest.mark.parametrize(
    "kind,k_dim,parts,slots,rank",
    [("plain", 1024, [512, 256, 256], 3, 8), ("partials", 2048, [1024], 1, 16),
     ("gated", 1024, [768, 768], 4, 16)],
)  # fmt: skip
def test_fused_lora_linear_matches_linear_plus_lora_add(tokens, kind, k_dim, parts, slots, rank):
    """The skinny kernel with the LoRA inside against linear + lora_add_ref: plain (with bias),
    split-K partial sums, gated (silu(gate) * up); base rows come out exactly as without LoRA."""
    gated, partials = kind == "gated", kind == "partials"
    x = torch.randn(tokens, k_dim, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(sum(parts), k_dim, device="cuda", dtype=torch.bfloat16) * 0.02
    bias = torch.randn(sum(parts), device="cuda", dtype=torch.bfloat16) if kind == "plain" else None
    lora = random_lora(k_dim, parts, slots, rank, tokens)
    want = lora_linear_ref(x, w, bias, lora, gated)
    base = lora.row_weights[lora.token_rows].sum(1) == 0
    configs = fused_lora_configs(w, bias, lora, partials, gated)
    assert configs and all(all(p % c[0] == 0 for p in parts) for c in configs)
    picked = [configs[0], [c for c in configs if len(c) == 5][-1] if partials else configs[-1]]
    ran = []
    for config in picked:
        try:
            got = skinny_linear(x, w, bias, config, gated, lora)
        except OutOfResources:  # wide tiles plus the A tiles: the tuner skips those
            continue
        ran.append(config)
        got = got.sum(0) if got.dim() == 3 else got
        torch.testing.assert_close(got.float(), want, atol=3e-2, rtol=3e-2)
        plain = skinny_linear(x, w, bias, config, gated)
        plain = plain.sum(0) if plain.dim() == 3 else plain
        assert torch.equal(got[base], plain[base])
    assert ran
    key = (w.shape[0], k_dim, triton_rows(tokens), x.dtype, partials, gated, lora.key())
    with linear_choices({key: ran[0]}):
        got = lora_linear(x, w, bias, lora, partials, gated)
    got = got.sum(0) if got.dim() == 3 else got
    torch.testing.assert_close(got.float(), want, atol=3e-2, rtol=3e-2)
    assert (want - lora_linear_ref(x, w, bias, RowLoRA(
        lora.lora_a, lora.lora_b, lora.row_weights * 0, lora.token_rows, parts, rank), gated)
    ).abs().max() > 0.1  # the LoRA changes the output  # fmt: skip


def triton_rows(tokens: int) -> int:
    return 1 << (tokens - 1).bit_length()


def layer_output(layer, call: str, x, batch, choices: dict, graph_weights=None):
    """float32 output of layer.<call>(x, batch) (partial sums added up) under forced tuner
    choices; with `graph_weights`, captured in a CUDA graph that is replayed after the batch's
    LoRA row weights were overwritten with them."""
    with linear_choices(choices):
        if graph_weights is None:
            out = getattr(layer, call)(x, batch)
        else:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
                out = getattr(layer, call)(x, batch)
            batch.lora_weights.copy_(graph_weights)
            graph.replay()
    return out.sum(0) if out.dim() == 3 else out.float()


@triton_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [2, 32])
def test_lora_layers_give_the_same_output_fused_and_unfused(tokens):
    """LinearWithLoRA (forward, forward_partials) and its gated form at the Qwen3-0.6B shapes
    with one rank-16 expert, half the rows on it: the fused kernel (forced), also replayed in
    a CUDA graph with other rows on the expert, against linear + lora_add_ (forced)."""
    from models.engine.attention import ForwardBatch
    from models.engine.lora import LinearWithLoRA

    gen = torch.Generator().manual_seed(1)
    layers = {  # name: (in, parts, how it is called)
        "qkv": (1024, [2048, 1024, 1024], "forward"), "o": (2048, [1024], "forward_partials"),
        "gate_up": (1024, [3072, 3072], "forward_gated"), "down": (3072, [1024], "forward_partials"),
    }  # fmt: skip
    odd_rows = (torch.arange(tokens, device="cuda") % 2).to(torch.bfloat16)[:, None]
    batch = ForwardBatch(
        is_decode=True, slot_mapping=torch.zeros(tokens, dtype=torch.long, device="cuda"),
        block_tables=torch.zeros(tokens, 1, dtype=torch.int32, device="cuda"),
        context_lens=torch.ones(tokens, dtype=torch.int32, device="cuda"),
        query_lens=[1] * tokens, token_rows=torch.arange(tokens, device="cuda"),
        lora_weights=odd_rows.clone(),
    )  # fmt: skip
    for name, (k_dim, parts, call) in layers.items():
        layer = LinearWithLoRA(k_dim, parts, False).cuda().to(torch.bfloat16)
        layer.weight.normal_(0, 0.02)
        layer.allocate_lora(num_slots=1, rank=16)
        for p, size in enumerate(parts):
            a = torch.randn(16, k_dim, generator=gen) * 0.05
            layer.set_slot(0, p, a, torch.randn(size, 16, generator=gen) * 0.05, 2.0)
        x = torch.randn(tokens, k_dim, device="cuda", dtype=torch.bfloat16)
        gated, partials = call == "forward_gated", call == "forward_partials"
        lora = layer.row_lora(batch)
        key = (sum(parts), k_dim, tokens, torch.bfloat16, partials, gated)
        configs = fused_lora_configs(layer.weight, None, lora, partials, gated)
        fused = [c for c in configs if len(c) == 5][-1] if partials else configs[0]
        plain = {key[:-1] + (False, None): None}  # the unfused path's matmul: cuBLAS
        unfused = {**plain, key + (lora.key(),): None}
        fused = {key + (lora.key(),): fused, **plain}

        batch.lora_weights.copy_(odd_rows)
        want = layer_output(layer, call, x, batch, unfused)
        torch.testing.assert_close(layer_output(layer, call, x, batch, fused), want,
                                   atol=3e-2, rtol=3e-2, msg=name)  # fmt: skip
        replayed = layer_output(layer, call, x, batch, fused, graph_weights=1 - odd_rows)
        want = layer_output(layer, call, x, batch, unfused)
        torch.testing.assert_close(replayed, want, atol=3e-2, rtol=3e-2, msg=name)


@triton_cuda
@pytest.mark.gpu
def test_lora_linear_tuner_times_fused_against_unfused():
    """At a tuned size (Qwen3-0.6B qkv, 8 MB) the first call times the fused configs against
    linear + lora_add_ and keeps a fused config or None; the answer is right either way. Eight
    adapters of rank 16 are too wide to fuse."""
    parts = [2048, 1024, 1024]
    w = torch.randn(4096, 1024, device="cuda", dtype=torch.bfloat16) * 0.02
    x = torch.randn(3, 1024, device="cuda", dtype=torch.bfloat16)
    lora = random_lora(1024, parts, 1, 16, 3)
    times = tuning.time_linear_configs(
        3, w, None, fused_lora_configs(w, None, lora)[:2], lora=lora
    )
    assert None in times and len(times) == 3 and all(t > 0 for t in times.values())
    key = (4096, 1024, 4, torch.bfloat16, False, False, lora.key())
    tuning._linear_choice.pop(key, None)
    got = lora_linear(x, w, None, lora)
    assert key in tuning._linear_choice
    assert tuning._linear_choice[key] in [None, *fused_lora_configs(w, None, lora)]
    torch.testing.assert_close(got.float(), lora_linear_ref(x, w, None, lora), atol=3e-2, rtol=3e-2)
    wide = random_lora(1024, parts, 8, 16, 3)
    assert fused_lora_configs(w, None, wide) == []


@triton_cuda
@pytest.mark.gpu
def test_a_shipped_tuner_choice_is_used_without_timing(monkeypatch, tmp_path):
    """A shape in models/engine/tuned/<GPU>.json takes the shipped config: nothing is timed."""
    import json

    w = torch.randn(4096, 2048, device="cuda", dtype=torch.bfloat16) * 0.02
    x = torch.randn(2, 2048, device="cuda", dtype=torch.bfloat16)
    key = (4096, 2048, 2, torch.bfloat16, False, False, None)
    config = SKINNY_CONFIGS[0]
    name = torch.cuda.get_device_name()
    table = {"device": name, "choices": {tuning._table_key(key): list(config)}}
    (tmp_path / f"{tuning.tuning_file_stem(name)}.json").write_text(json.dumps(table))
    monkeypatch.setattr(tuning, "TUNED_DIR", tmp_path)
    monkeypatch.setattr(tuning, "_shipped", {})
    monkeypatch.setattr(tuning, "_linear_choice", {})
    monkeypatch.setattr(tuning, "time_linear_configs", lambda *a, **k: pytest.fail("timed"))
    got = linear(x, w)
    assert tuning._linear_choice[key] == config
    assert tuning.tuning_table() == {tuning._table_key(key): list(config)}
    torch.testing.assert_close(got.float(), x.float() @ w.float().T, atol=2e-2, rtol=2e-2)
