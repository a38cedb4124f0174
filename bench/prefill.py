"""The torch engine's prefill on one GPU: the attention kernel, prefill tok/s, the whole engine
(prefill + decode), TTFT and the chunk size, against transformers' SDPA prefill in the same run.

Qwen3-1.7B shape with random bf16 weights (the checkpoint and helpers of bench/engine_gpu.py).
Sections (--sections, comma-separated):
- ceiling: cuBLAS bf16 matmul TFLOP/s (the MFU denominator next to the datasheet's 989).
- kernel: the varlen prefill attention kernel against dense causal SDPA (flash) and the old
  per-row torch path, for 1x2048, 16x512, 128x128, 128x1024 prompt tokens.
- hf: transformers (SDPA attention) prefill tok/s of the same shapes, logits of the last token.
- prefill: LLMEngine prefill tok/s (requests with max_tokens 1; steps of the token budget).
- chunk: the token budget swept: prefill tok/s, and how long 32 decoding rows stall per step
  while a 4096-token prompt prefills next to them.
- engine: the whole engine, 1..128 requests of 128 prompt + 128 new tokens; TTFT p50/p99 of
  128 requests arriving together.
- greedy: greedy tokens with the Triton prefill against the torch reference prefill.
- profile: the kernels of one 8192-token prefill step.
Prints a table last and writes JSON.

    PYTHONUNBUFFERED=1 python3 bench/prefill.py --out $OUT          # H100 / H200
    python bench/prefill.py --device cpu --tiny --sections prefill,engine,greedy   # CPU logic
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.engine_gpu import (  # noqa: E402
    SHAPES,
    build_checkpoint,
    load_hf,
    log,
    matching_prefix,
    synchronize,
)  # fmt: skip
from models.engine.config import EngineConfig  # noqa: E402
from models.engine.kernels import prefill_attention as pa  # noqa: E402

PROMPT_SHAPES = [(1, 2048), (16, 512), (128, 128), (128, 1024)]  # (rows, prompt tokens)
DATASHEET_TFLOPS = 989.0  # H100 / H200 SXM dense bf16
KERNEL_CONFIGS = [(128, 64, 8, 2), (128, 64, 4, 2), (128, 64, 8, 3), (128, 128, 8, 2),
                  (64, 64, 4, 3), (64, 128, 4, 2)]  # fmt: skip
TARGETS = {"prefill_tok_s_8k": 80000, "engine_tok_s_128": 15000, "ttft_p50_ms_128": 300}


def model_flops_per_token(shape: dict, context: float) -> float:
    """Forward FLOPs of one prompt token: 2 per weight of the layers (the lm_head runs for one
    token per row: left out) plus causal attention over `context` keys on average."""
    h, inter, d = shape["hidden_size"], shape["intermediate_size"], shape["head_dim"]
    nh, nkv, layers = (
        shape["num_attention_heads"],
        shape["num_key_value_heads"],
        shape["num_hidden_layers"],
    )
    weights = layers * (h * (nh + 2 * nkv) * d + nh * d * h + 3 * h * inter)
    return 2 * weights + layers * 4 * context * nh * d


def mfu(tok_s: float, shape: dict, prompt_len: int) -> float:
    return tok_s * model_flops_per_token(shape, (prompt_len + 1) / 2) / (DATASHEET_TFLOPS * 1e12)


def event_ms(fn, iters: int = 10, warmup: int = 2) -> float:
    """Median ms of fn() by CUDA events (wall clock on CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if torch.cuda.is_available():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


# ----------------------------------------------------------------------------- sections


def bench_ceiling(results: dict) -> None:
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = event_ms(lambda: a @ b, iters=20)
    results["matmul_tflops"] = 2 * n**3 / ms / 1e9
    log(f"cuBLAS bf16 {n}^3: {results['matmul_tflops']:.0f} TFLOP/s")


def bench_kernel(shape: dict, results: dict, block_size: int = 16) -> None:
    """Attention alone, Qwen3-1.7B heads: the Triton kernel over a paged cache (blocks shuffled)
    against dense causal SDPA (flash: the floor of a dense layout) and the old per-row path."""
    from models.engine.attention import ForwardBatch

    heads, kv_heads, dim = (
        shape["num_attention_heads"],
        shape["num_key_value_heads"],
        shape["head_dim"],
    )
    rows_out = []
    for rows, length in PROMPT_SHAPES:
        tokens = rows * length
        blocks_per_row = math.ceil(length / block_size)
        num_blocks = 1 + rows * blocks_per_row
        kc = torch.randn(num_blocks, block_size, kv_heads, dim, device="cuda", dtype=torch.bfloat16)
        vc = torch.randn_like(kc)
        tables = (
            (torch.randperm(num_blocks - 1, device="cuda") + 1).view(rows, blocks_per_row).int()
        )
        q = torch.randn(tokens, heads, dim, device="cuda", dtype=torch.bfloat16)
        cu = torch.arange(0, tokens + 1, length, device="cuda", dtype=torch.int32)
        ctx = torch.full((rows,), length, device="cuda", dtype=torch.int32)
        scale = dim**-0.5
        kernel_ms = event_ms(
            partial(pa.prefill_attention, q, kc, vc, tables, cu, ctx, length, scale)
        )
        qd = q.view(rows, length, heads, dim).transpose(1, 2)
        kd = torch.randn(rows, kv_heads, length, dim, device="cuda", dtype=torch.bfloat16)
        vd = torch.randn_like(kd)
        sdpa_ms = event_ms(
            partial(F.scaled_dot_product_attention, qd, kd, vd, is_causal=True, enable_gqa=True)
        )
        flops = rows * 4 * heads * dim * length * (length + 1) / 2
        sweep = {}
        for config in KERNEL_CONFIGS:  # tile rows, BLOCK_N, warps, stages
            try:
                ms = event_ms(
                    partial(pa._launch, q, kc, vc, tables, cu, ctx, length, scale, config)
                )
                sweep["x".join(map(str, config))] = ms
            except Exception as exc:  # a config that does not fit (shared memory) is skipped
                sweep["x".join(map(str, config))] = repr(exc)[:80]
        row = {
            "rows": rows,
            "prompt_len": length,
            "kernel_ms": kernel_ms,
            "sdpa_flash_ms": sdpa_ms,
            "kernel_tflops": flops / kernel_ms / 1e9,
            "sdpa_tflops": flops / sdpa_ms / 1e9,
            "config_sweep_ms": sweep,
        }
        if tokens <= 16384:  # the old path: one masked SDPA per row, a host sync per row
            batch = ForwardBatch(is_decode=False, slot_mapping=cu, block_tables=tables,
                                 context_lens=ctx, query_lens=[length] * rows, token_rows=cu)  # fmt: skip
            row["old_per_row_ms"] = event_ms(partial(old_varlen, q, kc, vc, batch, scale), iters=3)
        rows_out.append(row)
        log(f"attention {rows}x{length} configs (rows x BLOCK_N x warps x stages): {sweep}")
        log(f"attention {rows}x{length}: kernel {kernel_ms:.3f} ms ({row['kernel_tflops']:.0f} TFLOP/s), "
            f"dense SDPA flash {sdpa_ms:.3f} ms ({row['sdpa_tflops']:.0f}), old per-row "
            f"{row.get('old_per_row_ms', float('nan')):.1f} ms")  # fmt: skip
    results["attention_kernel"] = rows_out


def old_varlen(q, k_cache, v_cache, batch, scale):
    """The path this replaces (verbatim logic): per row, int() of its context length (a host
    sync), a gathered dense K/V and a boolean mask, which keeps SDPA off its flash kernel."""
    head_dim = q.shape[2]
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    outputs, start = [], 0
    for row, q_len in enumerate(batch.query_lens):
        ctx = int(batch.context_lens[row])
        blocks = batch.block_tables[row, : (ctx + block_size - 1) // block_size].long()
        k = k_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:ctx]
        v = v_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:ctx]
        q_pos = torch.arange(ctx - q_len, ctx, device=q.device)
        mask = torch.arange(ctx, device=q.device)[None, :] <= q_pos[:, None]
        out = F.scaled_dot_product_attention(
            q[start : start + q_len].transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
            attn_mask=mask, scale=scale, enable_gqa=True,
        )  # fmt: skip
        outputs.append(out.transpose(0, 1))
        start += q_len
    return torch.cat(outputs, dim=0)


@torch.inference_mode()
def bench_hf(path: Path, device, shape: dict, results: dict) -> None:
    """transformers' prefill (SDPA attention: flash for a causal batch without padding), one
    forward of the whole batch, logits of the last token only."""
    model = load_hf(path, device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    log(f"transformers attention: {model.config._attn_implementation}")
    out = {}
    for rows, length in PROMPT_SHAPES:
        ids = torch.randint(2, shape["vocab_size"], (rows, length), device=device)
        try:
            ms = event_ms(partial(model, input_ids=ids, use_cache=False, logits_to_keep=1), iters=5)
            out[f"{rows}x{length}"] = rows * length / ms * 1000
            log(
                f"transformers prefill {rows}x{length}: {ms:.1f} ms, {out[f'{rows}x{length}']:.0f} tok/s"
            )
        except torch.OutOfMemoryError as exc:
            out[f"{rows}x{length}"] = None
            log(f"transformers prefill {rows}x{length}: {exc!r}")
            torch.cuda.empty_cache()
    results["hf_prefill_tok_s"] = out


class EngineDriver:
    """One LLMEngine for every engine section; requests of random tokens, timed on the host
    with the GPU synchronized around each measurement."""

    def __init__(self, path: Path, device, shape: dict, budget: int | None):
        from models.engine.llm_engine import LLMEngine

        self.device, self.shape, self.path = device, shape, path
        max_len = 4096 + 256
        extra = {} if budget is None else {"max_num_batched_tokens": budget}
        config = EngineConfig(device=device.type, max_num_seqs=128, max_model_len=max_len,
                              num_kv_blocks=2 + 128 * math.ceil((1024 + 160) / 16) + 2 * max_len // 16,
                              **extra)  # fmt: skip
        self.engine = LLMEngine(config, path, tokenizer=None)
        self.budget = self.engine.scheduler.max_batched_tokens
        self.gen = torch.Generator().manual_seed(3)
        self.counter = 0

    def add(self, rows: int, prompt_len: int, new_tokens: int) -> list[str]:
        from models.protocol.requests import GenerationRequest, SamplingParams

        ids = []
        for _ in range(rows):
            self.counter += 1
            rid = f"r{self.counter:06d}"
            prompt = torch.randint(
                2, self.shape["vocab_size"], (prompt_len,), generator=self.gen
            ).tolist()
            params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
            self.engine.add_request(GenerationRequest(rid, prompt, params))
            ids.append(rid)
        return ids

    def run(self, rows: int, prompt_len: int, new_tokens: int) -> dict:
        """Add the requests at once and step until all finish: wall time, time to each request's
        first token, time until every request has one, generated tokens."""
        synchronize(self.device)
        t0 = time.perf_counter()
        ids = set(self.add(rows, prompt_len, new_tokens))
        first: dict[str, float] = {}
        generated, decode_start, decode_tokens, steps = 0, None, 0, 0
        while self.engine.has_unfinished():
            outs = self.engine.step()
            steps += 1
            now = time.perf_counter()
            for out in outs:
                if out.token_ids and out.request_id not in first:
                    first[out.request_id] = now - t0
                generated += len(out.token_ids)
                if decode_start is not None:
                    decode_tokens += len(out.token_ids)
            if decode_start is None and len(first) == len(ids):
                decode_start = now
        synchronize(self.device)
        wall = time.perf_counter() - t0
        ttft = sorted(first.values())
        decode_s = wall - (decode_start - t0) if decode_start is not None else 0.0
        return {"rows": rows, "prompt_len": prompt_len, "new_tokens": new_tokens, "wall_s": wall,
                "steps": steps, "generated": generated, "tok_s": generated / wall,
                "all_first_token_s": decode_start - t0 if decode_start else wall,
                "ttft_p50_ms": 1000 * ttft[len(ttft) // 2], "ttft_p99_ms": 1000 * ttft[min(len(ttft) - 1, math.ceil(0.99 * len(ttft)) - 1)],
                "decode_tok_s": decode_tokens / decode_s if decode_s > 0 else None}  # fmt: skip


def run_poisson(driver: EngineDriver, rate: float, n: int, prompt_len: int, new_tokens: int):
    """n requests arriving as a Poisson stream of `rate` per second, stepped as they come:
    TTFT from each request's own arrival, p50/p99, and the generated tok/s."""
    rng = torch.Generator().manual_seed(11)
    gaps = torch.empty(n).exponential_(rate, generator=rng).tolist()
    arrivals = [sum(gaps[: i + 1]) for i in range(n)]
    synchronize(driver.device)
    t0 = time.perf_counter()
    arrived: dict[str, float] = {}
    ttft: list[float] = []
    generated, next_i = 0, 0
    while next_i < n or driver.engine.has_unfinished():
        now = time.perf_counter() - t0
        while next_i < n and arrivals[next_i] <= now:
            (rid,) = driver.add(1, prompt_len, new_tokens)
            arrived[rid] = arrivals[next_i]
            next_i += 1
        if not driver.engine.has_unfinished():
            time.sleep(max(0.0, arrivals[next_i] - now))
            continue
        outs = driver.engine.step()
        now = time.perf_counter() - t0
        for out in outs:
            generated += len(out.token_ids)
            if out.token_ids and out.request_id in arrived:
                ttft.append(now - arrived.pop(out.request_id))
    wall = time.perf_counter() - t0
    ttft.sort()
    return {"rate_per_s": rate, "requests": n, "tok_s": generated / wall,
            "ttft_p50_ms": 1000 * ttft[len(ttft) // 2],
            "ttft_p99_ms": 1000 * ttft[min(len(ttft) - 1, math.ceil(0.99 * len(ttft)) - 1)]}


def bench_poisson(driver: EngineDriver, results: dict) -> None:
    driver.run(8, 128, 8)  # warm-up
    results["ttft_poisson"] = []
    for rate in (25.0, 50.0, 100.0):
        r = run_poisson(driver, rate, 256, 128, 128)
        results["ttft_poisson"].append(r)
        log(f"Poisson {rate:.0f} req/s x 256 (128+128): {r['tok_s']:.0f} tok/s, "
            f"TTFT p50 {r['ttft_p50_ms']:.0f} / p99 {r['ttft_p99_ms']:.0f} ms")


def bench_prefill(driver: EngineDriver, shape: dict, results: dict) -> None:
    for rows, length in ((4, 256), (1, 128), (3, 1000), (16, 512)):  # warm-up: compiles, handles
        driver.run(rows, length, 1)
    out = []
    for rows, length in PROMPT_SHAPES:
        r = driver.run(rows, length, 1)
        tok_s = rows * length / r["wall_s"]
        out.append({"rows": rows, "prompt_len": length, "tokens": rows * length, "steps": r["steps"],
                    "wall_ms": 1000 * r["wall_s"], "tok_s": tok_s, "mfu": mfu(tok_s, shape, length)})  # fmt: skip
        log(
            f"engine prefill {rows}x{length}: {r['steps']} steps, {1000 * r['wall_s']:.1f} ms, "
            f"{tok_s:.0f} tok/s, MFU {out[-1]['mfu']:.1%} (budget {driver.budget})"
        )
    results["engine_prefill"] = out


def bench_chunk(driver: EngineDriver, shape: dict, results: dict) -> None:
    """The token budget: prefill tok/s of 32x1024 prompt tokens, and the step time 32 decoding
    rows see while a 4096-token prompt prefills beside them (their inter-token stall)."""
    sched = driver.engine.scheduler
    saved, out = sched.max_batched_tokens, []
    for budget in (512, 1024, 2048, 4096, 8192, 16384):
        sched.max_batched_tokens = budget
        r = driver.run(32, 1024, 1)
        tok_s = 32 * 1024 / r["wall_s"]
        driver.add(32, 64, 4000)  # decode rows, aborted below
        while driver.engine.scheduler.waiting or any(
            s.num_uncomputed > 1 for s in driver.engine.scheduler.running
        ):
            driver.engine.step()
        for _ in range(5):
            driver.engine.step()
        synchronize(driver.device)
        long_id = driver.add(1, 4096, 1)[0]
        step_ms, t0, done = [], time.perf_counter(), None
        while done is None:
            t = time.perf_counter()
            outs = driver.engine.step()
            step_ms.append(1000 * (time.perf_counter() - t))
            if any(o.request_id == long_id and o.token_ids for o in outs):
                done = time.perf_counter() - t0
        for request_id in list(driver.engine.seqs):
            driver.engine.abort(request_id)
        while driver.engine.has_unfinished():
            driver.engine.step()
        out.append({"budget": budget, "prefill_tok_s": tok_s, "mfu": mfu(tok_s, shape, 1024),
                    "decode_stall_ms_max": max(step_ms), "decode_stall_ms_mean": statistics.mean(step_ms),
                    "long_prompt_ttft_ms": 1000 * done})  # fmt: skip
        log(
            f"budget {budget}: prefill 32x1024 {tok_s:.0f} tok/s; 32 decode rows + 4096-token prompt: "
            f"step {statistics.mean(step_ms):.1f} ms mean / {max(step_ms):.1f} max, its TTFT {1000 * done:.0f} ms"
        )
    sched.max_batched_tokens = saved
    results["chunk_sweep"] = out


def bench_engine(driver: EngineDriver, results: dict) -> None:
    out = []
    for rows in (1, 2, 4, 8, 16, 32, 64, 128):
        r = driver.run(rows, 128, 128)
        out.append(r)
        log(f"whole engine {rows} x (128 + 128): {r['wall_s'] * 1000:.0f} ms, {r['tok_s']:.0f} tok/s generated, "
            f"decode phase {r['decode_tok_s'] or 0:.0f} tok/s, TTFT p50 {r['ttft_p50_ms']:.0f} / p99 {r['ttft_p99_ms']:.0f} ms")  # fmt: skip
    results["whole_engine"] = out
    r = driver.run(128, 128, 1)
    results["ttft_128"] = {
        "p50_ms": r["ttft_p50_ms"],
        "p99_ms": r["ttft_p99_ms"],
        "steps": r["steps"],
    }
    log(
        f"TTFT, 128 requests arriving together: p50 {r['ttft_p50_ms']:.0f} ms, p99 {r['ttft_p99_ms']:.0f} ms"
    )


def bench_greedy(driver: EngineDriver, results: dict) -> None:
    """Greedy tokens with the Triton prefill against the torch reference prefill (same engine,
    same weights; prompts of several lengths, one chunked by a small budget)."""
    from models.protocol.requests import GenerationRequest, SamplingParams

    gen = torch.Generator().manual_seed(11)
    prompts = [torch.randint(2, driver.shape["vocab_size"], (n,), generator=gen).tolist()
               for n in (5, 77, 300, 1000)]  # fmt: skip

    def greedy(eng, tag: str) -> list[list[int]]:
        for i, p in enumerate(prompts):
            eng.add_request(
                GenerationRequest(
                    f"{tag}{i}", p, SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
                )
            )
        tokens: dict[str, list[int]] = {}
        while eng.has_unfinished():
            for out in eng.step():
                tokens.setdefault(out.request_id, []).extend(out.token_ids)
        return [tokens[f"{tag}{i}"] for i in range(len(prompts))]

    def compare(eng, name: str) -> list[int]:
        kernel = greedy(eng, "k")
        pa.ENABLED = False
        try:
            reference = greedy(eng, "t")
        finally:
            pa.ENABLED = True
        match = [matching_prefix(a, b) for a, b in zip(kernel, reference, strict=True)]
        log(
            f"greedy tokens {name}, Triton prefill vs torch reference: matching prefix {match} of 32"
        )
        return match

    results["greedy_match"] = {
        "prompt_lens": [len(p) for p in prompts],
        "matching_tokens": compare(driver.engine, "bf16"),
        "of": 32,
    }
    if driver.device.type == "cuda":  # float32: both paths exact to ~1e-6, so no near-tie flips
        from models.engine.llm_engine import LLMEngine

        config = EngineConfig(device="cuda", dtype="float32", max_num_seqs=8, max_model_len=2048,
                              num_kv_blocks=600, cuda_graphs=False)  # fmt: skip
        fp32 = LLMEngine(config, driver.path, tokenizer=None)
        results["greedy_match"]["matching_tokens_fp32"] = compare(fp32, "fp32")


def profile_step(driver: EngineDriver, results: dict) -> None:
    import cProfile
    import io
    import pstats

    from torch.profiler import ProfilerActivity, profile

    profiler = cProfile.Profile()  # host time of small prefill steps (8 x 128 tokens, 5 runs)
    profiler.enable()
    for _ in range(5):
        driver.run(8, 128, 1)
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(18)
    log(
        "host profile of 5 prefill steps of 8 x 128 tokens, by tottime:\n" + text.getvalue()[-4000:]
    )

    driver.run(8, 1024, 1)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        driver.run(8, 1024, 1)
        synchronize(driver.device)
    table = prof.key_averages().table(
        sort_by="cuda_time_total", row_limit=14, max_name_column_width=60
    )
    log("one 8x1024 prefill, kernels by GPU time:\n" + table)


# ----------------------------------------------------------------------------- report


def table(results: dict) -> str:
    card = results["device"]
    hf = results.get("hf_prefill_tok_s", {})
    lines = [f"Card: {card}; baseline transformers {results.get('transformers', '?')} SDPA prefill, same run.", "",
             "| prefill | tokens | engine tok/s | MFU | transformers SDPA tok/s | speed-up | attention kernel ms (TFLOP/s) | dense flash SDPA ms | old per-row ms |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    kern = {(k["rows"], k["prompt_len"]): k for k in results.get("attention_kernel", [])}
    for row in results.get("engine_prefill", []):
        key = f"{row['rows']}x{row['prompt_len']}"
        base = hf.get(key)
        k = kern.get((row["rows"], row["prompt_len"]))
        cells = [key, str(row["tokens"]), f"{row['tok_s']:.0f}", f"{row['mfu']:.1%}",
                 f"{base:.0f}" if base else "—", f"{row['tok_s'] / base:.2f}x" if base else "—"]  # fmt: skip
        if k:
            old = k.get("old_per_row_ms")
            cells += [f"{k['kernel_ms']:.3f} ({k['kernel_tflops']:.0f})", f"{k['sdpa_flash_ms']:.3f}",
                      f"{old:.1f}" if old else "—"]  # fmt: skip
        else:
            cells += ["—"] * 3
        lines.append("| " + " | ".join(cells) + " |")
    if results.get("whole_engine"):
        lines += ["", "| whole engine, N x (128 + 128) | wall ms | tok/s generated | decode-phase tok/s | TTFT p50 / p99 ms |",
                  "|---|---|---|---|---|"]  # fmt: skip
        for r in results["whole_engine"]:
            lines.append(f"| {r['rows']} | {1000 * r['wall_s']:.0f} | {r['tok_s']:.0f} | {r['decode_tok_s'] or 0:.0f} | "
                         f"{r['ttft_p50_ms']:.0f} / {r['ttft_p99_ms']:.0f} |")  # fmt: skip
    if results.get("chunk_sweep"):
        lines += ["", "| token budget | prefill 32x1024 tok/s | MFU | 32 decode rows beside a 4096-token prompt: step ms mean / max | its TTFT ms |",
                  "|---|---|---|---|---|"]  # fmt: skip
        for r in results["chunk_sweep"]:
            lines.append(f"| {r['budget']} | {r['prefill_tok_s']:.0f} | {r['mfu']:.1%} | "
                         f"{r['decode_stall_ms_mean']:.1f} / {r['decode_stall_ms_max']:.1f} | {r['long_prompt_ttft_ms']:.0f} |")  # fmt: skip
    t = results.get("ttft_128")
    if t:
        lines.append(f"\nTTFT, 128 x 128-token requests arriving together: p50 {t['p50_ms']:.0f} ms, p99 {t['p99_ms']:.0f} ms "
                     f"(target p50 <= {TARGETS['ttft_p50_ms_128']})")  # fmt: skip
    for r in results.get("ttft_poisson", []):
        lines.append(f"Poisson stream {r['rate_per_s']:.0f} req/s x {r['requests']} (128+128): "
                     f"{r['tok_s']:.0f} tok/s, TTFT p50 {r['ttft_p50_ms']:.0f} ms, "
                     f"p99 {r['ttft_p99_ms']:.0f} ms")  # fmt: skip
    if results.get("greedy_match"):
        g = results["greedy_match"]
        lines.append(
            f"Greedy tokens, Triton prefill vs torch reference, prompts {g['prompt_lens']}: matching "
            f"{g['matching_tokens']} of {g['of']} in bf16, {g.get('matching_tokens_fp32')} in fp32"
        )
    for k in results.get("attention_kernel", []):
        times = {c: v for c, v in k["config_sweep_ms"].items() if isinstance(v, float)}
        if times:
            best = min(times, key=times.get)
            lines.append(f"attention {k['rows']}x{k['prompt_len']}: default {k['kernel_ms']:.3f} ms, "
                         f"best config {best} {times[best]:.3f} ms")  # fmt: skip
    if results.get("matmul_tflops"):
        lines.append(
            f"MFU against the datasheet {DATASHEET_TFLOPS:.0f} TFLOP/s; measured cuBLAS bf16 8192^3: {results['matmul_tflops']:.0f} TFLOP/s"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny model shape (CPU logic check)")
    parser.add_argument("--sections",
                        default="ceiling,kernel,hf,prefill,chunk,engine,poisson,greedy")
    parser.add_argument(
        "--budget", type=int, default=None, help="max_num_batched_tokens (default: config's)"
    )
    parser.add_argument("--checkpoint", default="/tmp/tandem-bench-qwen3")
    parser.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    parser.add_argument("--name", default="prefill_gpu.json")
    args = parser.parse_args()
    device = torch.device(args.device)
    shape = SHAPES["tiny" if args.tiny else "qwen3-1.7b"]
    if args.tiny:  # a logic check: small enough for the CPU
        PROMPT_SHAPES[:] = [(rows // 16 or 1, length // 16) for rows, length in PROMPT_SHAPES]
    sections = set(args.sections.split(","))
    import transformers

    results: dict = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                     "torch": torch.__version__, "transformers": transformers.__version__,
                     "shape": shape, "targets": TARGETS, "datasheet_tflops": DATASHEET_TFLOPS}  # fmt: skip
    path = Path(args.checkpoint + ("-tiny" if args.tiny else ""))
    params = build_checkpoint(path, shape, device)
    log(f"checkpoint {params / 1e9:.3f} B params at {path}")
    if device.type == "cuda" and "ceiling" in sections:
        bench_ceiling(results)
    if device.type == "cuda" and "kernel" in sections:
        bench_kernel(shape, results)
    if "hf" in sections:
        bench_hf(path, device, shape, results)
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the transformers model is gone with bench_hf's frame
    if sections & {"prefill", "chunk", "engine", "poisson", "greedy", "profile"}:
        driver = EngineDriver(path, device, shape, args.budget)
        results["budget"] = driver.budget
        if "prefill" in sections:
            bench_prefill(driver, shape, results)
        if "profile" in sections and device.type == "cuda":
            profile_step(driver, results)
        if "engine" in sections:
            bench_engine(driver, results)
        if "poisson" in sections:
            bench_poisson(driver, results)
        if "chunk" in sections:
            bench_chunk(driver, shape, results)
        if "greedy" in sections:
            bench_greedy(driver, results)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / args.name).write_text(json.dumps(results, indent=1))
    print()
    print(table(results))
    print(f"\nJSON: {out / args.name}")


if __name__ == "__main__":
    main()
