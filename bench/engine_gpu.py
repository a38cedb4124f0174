"""The torch engine's decode speed on one GPU, against transformers and the bandwidth floor.

Builds a Qwen3-1.7B-shaped checkpoint with random bf16 weights (speed does not depend on the
values), loads it through the engine's loader, and times, in one run: the bandwidth floor
(weight bytes / measured copy bandwidth), transformers with a static cache in a CUDA graph
(baseline), and the engine's CUDA-graph decode step (bs 1, 32), throughput with 128 sequences,
per-row steering on 4 layers, 8 mixed LoRA adapters, engine start; plus bf16 logits and
greedy tokens against transformers. Prints one table last and writes JSON.

    PYTHONUNBUFFERED=1 python3 bench/engine_gpu.py --out $OUT        # H200
    python bench/engine_gpu.py --device cpu --tiny                   # logic check on CPU
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.engine.attention import ForwardBatch  # noqa: E402
from models.engine.config import EngineConfig  # noqa: E402
from models.engine.cuda_graph import CudaGraphRunner  # noqa: E402
from models.engine.kernels.decode_attention import (  # noqa: E402
    decode_partition_size,
    paged_decode_attention,
    paged_decode_attention_ref,
)
from models.engine.model_runner import ModelRunner  # noqa: E402

SHAPES = {
    "qwen3-1.7b": dict(hidden_size=2048, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, intermediate_size=6144,
                       vocab_size=151936),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=32, intermediate_size=128, vocab_size=512),
}
TARGETS = {"step_bs1_ms": 1.6, "step_bs32_ms": 4.0, "tok_s_128": 20000, "steer_overhead_pct": 3.0,
           "lora_overhead_pct": 15.0, "engine_start_s": 60.0}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def build_checkpoint(path: Path, shape: dict, device: torch.device, seed: int = 0) -> int:
    """Write config.json + model.safetensors of a random Qwen3 model; returns the param count."""
    from safetensors.torch import save_file

    cfg = dict(shape, model_type="qwen3", architectures=["Qwen3ForCausalLM"], hidden_act="silu",
               rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=40960,
               tie_word_embeddings=True, attention_bias=False, torch_dtype="bfloat16",
               bos_token_id=0, eos_token_id=1)
    done = path / "model.safetensors"
    if done.exists() and json.loads((path / "config.json").read_text()) == cfg:
        from safetensors import safe_open

        with safe_open(str(done), "pt") as f:
            return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg, indent=1))
    gen = torch.Generator(device=device).manual_seed(seed)
    h, inter, d = shape["hidden_size"], shape["intermediate_size"], shape["head_dim"]
    nh, nkv = shape["num_attention_heads"], shape["num_key_value_heads"]

    def rand(*size, std=0.02):
        return (torch.randn(*size, generator=gen, device=device) * std).to(torch.bfloat16).cpu()

    weights = {"model.embed_tokens.weight": rand(shape["vocab_size"], h, std=0.05),
               "model.norm.weight": torch.ones(h, dtype=torch.bfloat16)}
    for i in range(shape["num_hidden_layers"]):
        p = f"model.layers.{i}."
        weights |= {
            p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
            p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
            p + "self_attn.q_proj.weight": rand(nh * d, h),
            p + "self_attn.k_proj.weight": rand(nkv * d, h),
            p + "self_attn.v_proj.weight": rand(nkv * d, h),
            p + "self_attn.o_proj.weight": rand(h, nh * d),
            p + "self_attn.q_norm.weight": torch.ones(d, dtype=torch.bfloat16),
            p + "self_attn.k_norm.weight": torch.ones(d, dtype=torch.bfloat16),
            p + "mlp.gate_proj.weight": rand(inter, h),
            p + "mlp.up_proj.weight": rand(inter, h),
            p + "mlp.down_proj.weight": rand(h, inter),
        }
    save_file(weights, str(path / "model.safetensors"))
    return sum(w.numel() for w in weights.values())


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_ms(fn, device: torch.device, iters: int, warmup: int = 3) -> float:
    """Mean wall time of fn() in ms, synchronized around the whole loop."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) * 1000 / iters


def graph_ms(fn, device: torch.device, calls: int = 20, replays: int = 10) -> float:
    """ms per call of fn, measured as `calls` calls captured in one CUDA graph (no launch cost)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return time_ms(graph.replay, device, iters=replays) / calls


def copy_bandwidth(device: torch.device) -> float:
    """Device copy bandwidth in bytes/s, counting bytes read and written."""
    n = (1 << 30) if device.type == "cuda" else (1 << 24)
    a = torch.empty(n, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    ms = time_ms(lambda: b.copy_(a), device, iters=20)
    return 2 * n / (ms / 1000)


# ----------------------------------------------------------------------------- transformers


def load_hf(path: Path, device: torch.device, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(device).eval()
    return model


@torch.inference_mode()
def bench_transformers(model, batch: int, prompt_len: int, cache_len: int, device, steps: int):
    """ms per decode step: static cache, the step captured in a CUDA graph (eager on CPU)."""
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=cache_len)
    vocab = model.config.vocab_size
    prompt = torch.randint(2, vocab, (batch, prompt_len), device=device)
    model(input_ids=prompt, past_key_values=cache, cache_position=torch.arange(prompt_len, device=device))
    ids = torch.randint(2, vocab, (batch, 1), device=device)
    pos = torch.tensor([prompt_len], device=device)

    def step():
        return model(input_ids=ids, past_key_values=cache, cache_position=pos).logits

    if device.type != "cuda":
        return time_ms(step, device, iters=steps, warmup=1)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return time_ms(graph.replay, device, iters=steps)


@torch.inference_mode()
def hf_greedy(model, prompt: list[int], new_tokens: int, device) -> tuple[torch.Tensor, list[int]]:
    """Last-position float logits of the prompt and the greedy continuation (transformers)."""
    ids = torch.tensor([prompt], device=device)
    logits = model(input_ids=ids).logits[0, -1].float()
    out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, min_new_tokens=new_tokens,
                         pad_token_id=0)
    return logits, out[0, len(prompt):].tolist()


# ----------------------------------------------------------------------------- engine


class DecodeBench:
    """The engine's model and paged KV cache driven by a plain decode loop: prefill through the
    model's varlen path, then decode steps replayed from CUDA graphs (greedy, the advance of
    positions/slots captured with the step, so a step is one graph launch)."""

    def __init__(self, runner: ModelRunner, max_batch: int, max_len: int):
        self.runner = runner
        self.model = runner.model
        self.device = runner.device
        self.block_size = runner.block_size
        self.blocks_per_seq = math.ceil(max_len / self.block_size)
        if 1 + max_batch * self.blocks_per_seq > runner.num_blocks:
            raise ValueError("KV cache too small for the bench")
        dev = self.device
        rows = torch.arange(max_batch, device=dev)
        self.tables = (1 + rows[:, None] * self.blocks_per_seq
                       + torch.arange(self.blocks_per_seq, device=dev)[None]).to(torch.int32)
        a = self.model.args
        self.buffers = {
            "ids": torch.zeros(max_batch, dtype=torch.int64, device=dev),
            "pos": torch.zeros(max_batch, dtype=torch.int64, device=dev),
            "slots": torch.zeros(max_batch, dtype=torch.int64, device=dev),
            "tables": self.tables.clone(),
            "ctx": torch.zeros(max_batch, dtype=torch.int32, device=dev),
            "rows": rows.clone(),
            "steer": torch.zeros(a.num_layers, max_batch, a.hidden_size, device=dev, dtype=runner.dtype),
            "lora": torch.zeros(max_batch, 8, device=dev, dtype=runner.dtype),
        }

    def step(self, views: dict[str, torch.Tensor], steer: bool, lora: bool, advance: bool) -> torch.Tensor:
        batch = ForwardBatch(
            is_decode=True, slot_mapping=views["slots"], block_tables=views["tables"],
            context_lens=views["ctx"], query_lens=[], token_rows=views["rows"],
            steer_deltas=views["steer"] if steer else None,
            lora_weights=views["lora"] if lora else None,
        )
        logits = self.runner.decode(views["ids"], views["pos"], batch)
        if advance:
            views["ids"].copy_(logits.argmax(-1))
            self.advance(views)
        return logits

    def advance(self, views: dict[str, torch.Tensor]) -> None:
        pos = views["pos"]
        pos.add_(1)
        views["ctx"].add_(1)
        block = views["tables"].gather(1, (pos // self.block_size)[:, None])[:, 0].long()
        views["slots"].copy_(block * self.block_size + pos % self.block_size)

    def graph(self, batch_sizes: list[int], steer=False, lora=False, advance=True) -> CudaGraphRunner:
        names = ["ids", "pos", "slots", "tables", "ctx", "rows"] + ["steer"] * steer + ["lora"] * lora
        runner = CudaGraphRunner(
            lambda v: self.step(v, steer, lora, advance),
            {n: self.buffers[n] for n in names}, batch_sizes, batch_dims={"steer": 1},
        )
        if self.device.type == "cuda":
            runner.capture()
        return runner

    def replay(self, graph: CudaGraphRunner, batch: int) -> torch.Tensor:
        if self.device.type == "cuda":
            return graph.replay(batch)
        return graph.step(graph.views(batch))

    @torch.inference_mode()
    def prefill(self, prompts: list[list[int]]) -> torch.Tensor:
        """Prefill rows 0..n-1 with the prompts and set the decode buffers to continue them
        greedily. Returns the float logits at each prompt's last token."""
        dev, bs = self.device, self.block_size
        logits_all = []
        chunk = max(1, 8192 // max(len(p) for p in prompts))
        for start in range(0, len(prompts), chunk):
            part = prompts[start:start + chunk]
            rows = list(range(start, start + len(part)))
            ids = torch.tensor([t for p in part for t in p], device=dev)
            positions = torch.cat([torch.arange(len(p), device=dev) for p in part])
            token_rows = torch.cat([torch.full((len(p),), i, device=dev) for i, p in enumerate(part)])
            tables = self.tables[rows]
            slots = tables[token_rows, positions // bs].long() * bs + positions % bs
            batch = ForwardBatch(
                is_decode=False, slot_mapping=slots, block_tables=tables,
                context_lens=torch.tensor([len(p) for p in part], dtype=torch.int32, device=dev),
                query_lens=[len(p) for p in part], token_rows=token_rows,
            )
            hidden = self.model(ids, positions, batch)
            last = torch.tensor([len(p) for p in part], device=dev).cumsum(0) - 1
            logits = self.model.compute_logits(hidden[last]).float()
            logits_all.append(logits)
        logits = torch.cat(logits_all)
        n = len(prompts)
        lens = torch.tensor([len(p) for p in prompts], device=dev)
        b = self.buffers
        b["ids"][:n] = logits.argmax(-1)
        b["pos"][:n] = lens - 1
        b["ctx"][:n] = lens.to(torch.int32)  # after the advance: the cache holds pos + 1 tokens
        self.advance({k: v[:n] for k, v in b.items() if k not in ("steer",)})
        return logits


def make_runner(path: Path, device: torch.device, max_batch: int, max_len: int, block_size=16):
    blocks = 1 + max_batch * math.ceil(max_len / block_size)
    config = EngineConfig(device=device.type, block_size=block_size, num_kv_blocks=blocks,
                          max_num_seqs=max_batch, max_model_len=max_len)
    return ModelRunner(config, path, max_len)


def add_lora(model, slots: int, rank: int, seed: int = 1) -> None:
    """Random rank-`rank` adapters in every slot of every q/k/v/o/gate/up/down projection."""
    gen = torch.Generator(device=model.embed_tokens.weight.device).manual_seed(seed)
    seen = set()
    for layer, part in model.lora_linears().values():
        if id(layer) not in seen:
            layer.allocate_lora(slots, rank)
            seen.add(id(layer))
        out = layer.part_sizes[part]
        for slot in range(slots):
            dev = layer.weight.device
            a = torch.randn(rank, layer.in_features, generator=gen, device=dev) * 0.02
            b = torch.randn(out, rank, generator=gen, device=dev) * 0.02
            layer.set_slot(slot, part, a, b, 2.0)


def remove_lora(model) -> None:
    for layer, _ in model.lora_linears().values():
        layer.lora_a = layer.lora_b = None


# ----------------------------------------------------------------------------- sections


def bench_kernels(device, shape, results: dict) -> None:
    """Attention kernel alone at the bench's contexts, against the bytes it must read."""
    if device.type != "cuda":
        return
    d, kvh, h = shape["head_dim"], shape["num_key_value_heads"], shape["num_attention_heads"]
    bw = results["copy_bandwidth_tb_s"] * 1e12
    rows = []
    for batch, ctx in ((1, 768), (32, 768), (128, 768), (1, 8192), (8, 4096)):
        blocks_per = math.ceil(ctx / 16)
        kc = torch.randn(1 + batch * blocks_per, 16, kvh, d, device=device, dtype=torch.bfloat16)
        vc = torch.randn_like(kc)
        tables = (1 + torch.arange(batch * blocks_per, device=device)).view(batch, blocks_per).to(torch.int32)
        lens = torch.full((batch,), ctx, dtype=torch.int32, device=device)
        q = torch.randn(batch, h, d, device=device, dtype=torch.bfloat16)
        call = (q, kc, vc, tables, lens, d**-0.5)
        ms = graph_ms(lambda c=call: paged_decode_attention(*c), device)
        ref_ms = graph_ms(lambda c=call: paged_decode_attention_ref(*c), device)
        kv_bytes = 2 * batch * ctx * kvh * d * 2
        chosen = decode_partition_size(batch, kvh, blocks_per * 16)
        by_partition = {}  # tokens per partition -> us (the engine's choice is `partition`)
        for part in (32, 64, 128, 256, 512):
            args = (*call, part)
            by_partition[part] = round(graph_ms(lambda c=args: paged_decode_attention(*c), device) * 1000, 2)
        rows.append({"batch": batch, "ctx": ctx, "triton_us": ms * 1000, "torch_sdpa_us": ref_ms * 1000,
                     "floor_us": kv_bytes / bw * 1e6, "partition": chosen, "us_by_partition": by_partition})
        log(f"attention bs {batch} ctx {ctx}: partition {chosen}; us by partition {by_partition}")
        log(f"attention bs {batch} ctx {ctx}: triton {ms*1000:.1f} us, torch {ref_ms*1000:.1f} us, "
            f"floor {kv_bytes / bw * 1e6:.1f} us")
    results["attention_kernel"] = rows


def bench_engine(path, device, shape, args, results: dict) -> DecodeBench:
    prompt_len, new_tokens = args.prompt_len, args.new_tokens
    max_len = prompt_len + new_tokens + 16
    max_batch = max(args.batch_sizes)
    synchronize(device)
    t0 = time.perf_counter()
    runner = make_runner(path, device, max_batch, max_len)
    bench = DecodeBench(runner, max_batch, max_len)
    synchronize(device)
    load_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    plain = bench.graph(args.batch_sizes)
    capture_s = time.perf_counter() - t1
    results["engine_load_s"] = load_s
    results["engine_capture_s"] = capture_s
    results["engine_start_s"] = load_s + capture_s
    log(f"engine load {load_s:.1f} s, capture {len(args.batch_sizes)} buckets {capture_s:.1f} s")

    vocab = shape["vocab_size"]
    gen = torch.Generator().manual_seed(1)
    prompts = torch.randint(2, vocab, (max_batch, prompt_len), generator=gen).tolist()
    synchronize(device)
    t = time.perf_counter()
    bench.prefill(prompts)
    synchronize(device)
    results["prefill_tok_s"] = max_batch * prompt_len / (time.perf_counter() - t)
    log(f"prefill {max_batch}x{prompt_len}: {results['prefill_tok_s']:.0f} tok/s")
    start_state = {k: v.clone() for k, v in bench.buffers.items()}

    def reset():
        for k, v in start_state.items():
            bench.buffers[k].copy_(v)

    steps = args.steps
    for batch in (1, 32):
        if batch > max_batch:
            continue
        reset()
        results[f"step_bs{batch}_ms"] = time_ms(lambda b=batch: bench.replay(plain, b), device, steps)
        log(f"engine decode step bs {batch}: {results[f'step_bs{batch}_ms']:.3f} ms")

    reset()
    synchronize(device)
    t = time.perf_counter()
    for _ in range(new_tokens):
        bench.replay(plain, max_batch)
    synchronize(device)
    elapsed = time.perf_counter() - t
    results["tok_s_128"] = max_batch * new_tokens / elapsed
    results["step_bs128_ms"] = elapsed * 1000 / new_tokens
    log(f"decode {max_batch} seqs x {new_tokens} tokens: {results['tok_s_128']:.0f} tok/s")

    steer_batch = min(32, max_batch)
    layers = shape["num_hidden_layers"]
    steer_layers = list(range(max(0, layers // 2 - 2), min(layers, layers // 2 + 2)))
    bench.buffers["steer"].zero_()
    bench.buffers["steer"][steer_layers, :steer_batch] = 0.5 * torch.randn(
        len(steer_layers), steer_batch, shape["hidden_size"], device=device, dtype=runner.dtype)
    steered = bench.graph([steer_batch], steer=True)
    reset()
    plain_ms = time_ms(lambda: bench.replay(plain, steer_batch), device, steps)
    reset()
    steer_ms = time_ms(lambda: bench.replay(steered, steer_batch), device, steps)
    results["steer_plain_ms"], results["steer_ms"] = plain_ms, steer_ms
    results["steer_overhead_pct"] = 100 * (steer_ms / plain_ms - 1)
    log(f"steering 4 layers bs {steer_batch}: {steer_ms:.3f} ms vs {plain_ms:.3f} ms")

    add_lora(bench.model, slots=8, rank=16)
    bench.buffers["lora"].zero_()
    rows = torch.arange(steer_batch, device=device)
    bench.buffers["lora"][rows, rows % 8] = 1.0
    lora_graph = bench.graph([steer_batch], lora=True)
    reset()
    lora_ms = time_ms(lambda: bench.replay(lora_graph, steer_batch), device, steps)
    results["lora_base_ms"], results["lora_ms"] = plain_ms, lora_ms
    results["lora_overhead_pct"] = 100 * (lora_ms / plain_ms - 1)
    log(f"8 LoRA adapters mixed bs {steer_batch}: {lora_ms:.3f} ms vs {plain_ms:.3f} ms")
    if "profile" in args.sections and device.type == "cuda":
        for batch, lora in ((1, False), (steer_batch, False), (steer_batch, True)):
            reset()
            results[f"profile_bs{batch}{'_lora' if lora else ''}"] = profile_step(bench, batch, lora)
    remove_lora(bench.model)
    return bench


def profile_step(bench: DecodeBench, batch: int, lora: bool, steps: int = 5) -> list[dict]:
    """GPU time per kernel name in one eager decode step (profiler), largest first."""
    from torch.profiler import ProfilerActivity, profile

    views = {k: v.narrow(1 if k == "steer" else 0, 0, batch) for k, v in bench.buffers.items()}
    for _ in range(2):
        bench.step(views, steer=False, lora=lora, advance=False)
    synchronize(bench.device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            bench.step(views, steer=False, lora=lora, advance=False)
        synchronize(bench.device)
    rows = []
    for e in prof.key_averages():
        us = getattr(e, "device_time_total", 0) or getattr(e, "cuda_time_total", 0)
        if us > 0 and e.count >= steps:
            rows.append({"kernel": e.key[:90], "per_step": e.count / steps, "us_per_step": us / steps})
    rows.sort(key=lambda r: -r["us_per_step"])
    total = sum(r["us_per_step"] for r in rows)
    log(f"profile bs {batch}{' + LoRA' if lora else ''}: {total:.0f} us of kernels per step, "
        f"{sum(r['per_step'] for r in rows):.0f} launches")
    for r in rows[:14]:
        log(f"   {r['us_per_step']:8.1f} us  x{r['per_step']:5.0f}  {r['kernel']}")
    return rows[:30]


@torch.inference_mode()
def check_correctness(
    bench: DecodeBench, hf_bf16, hf_fp32, shape, device, results: dict, prompt_len: int, new_tokens=32
) -> None:
    """The engine's bf16 logits against transformers in fp32 (the reference), next to
    transformers' own bf16 logits. Teacher-forced: both decode the fp32 model's greedy tokens,
    so every step compares logits for the same prefix; a random-weight model has near-ties that
    bf16 flips either way, so top-1 agreement is reported for both, not required to be 100 %.
    The engine's free-running greedy tokens are also compared (matching prefix length)."""
    gen = torch.Generator().manual_seed(7)
    lens = [7, prompt_len // 5, prompt_len * 2 // 3, prompt_len]
    prompts = [torch.randint(2, shape["vocab_size"], (n,), generator=gen).tolist() for n in lens]
    n = len(prompts)
    refs = [hf_greedy(hf_fp32, p, new_tokens, device)[1] for p in prompts]

    def hf_step_logits(model, prompt, tokens):  # logits predicting tokens[0..] given the prefix
        ids = torch.tensor([prompt + tokens[:-1]], device=device)
        return model(input_ids=ids).logits[0, len(prompt) - 1 :].float()

    graph = bench.graph([n], advance=False)
    for forced in (True, False):
        first = bench.prefill(prompts)
        engine_logits = [[first[r]] for r in range(n)]
        engine_tokens = [[int(first[r].argmax())] for r in range(n)]
        for step in range(1, new_tokens):
            if forced:
                bench.buffers["ids"][:n] = torch.tensor([ref[step - 1] for ref in refs], device=device)
            logits = bench.replay(graph, n)
            for r in range(n):
                engine_logits[r].append(logits[r].clone())
                engine_tokens[r].append(int(logits[r].argmax()))
            bench.buffers["ids"][:n] = logits.argmax(-1)
            bench.advance({k: v[:n] for k, v in bench.buffers.items() if k != "steer"})
        if not forced:
            free_tokens = engine_tokens
        else:
            forced_logits = [torch.stack(x) for x in engine_logits]
    rows = []
    for r, prompt in enumerate(prompts):
        ref = hf_step_logits(hf_fp32, prompt, refs[r])
        half = hf_step_logits(hf_bf16, prompt, refs[r])
        eng = forced_logits[r]
        rows.append(
            {
                "prompt_len": len(prompt),
                "logit_std": ref.std().item(),
                "engine_max_abs_diff": (eng - ref).abs().max().item(),
                "hf_bf16_max_abs_diff": (half - ref).abs().max().item(),
                "engine_top1_agree": (eng.argmax(-1) == ref.argmax(-1)).float().mean().item(),
                "hf_bf16_top1_agree": (half.argmax(-1) == ref.argmax(-1)).float().mean().item(),
                "engine_greedy_match": matching_prefix(free_tokens[r], refs[r]),
                "of": new_tokens,
            }
        )
        x = rows[-1]
        log(
            f"correctness prompt {len(prompt)} ({new_tokens} teacher-forced steps): max |logit - fp32| "
            f"engine {x['engine_max_abs_diff']:.3f}, transformers bf16 {x['hf_bf16_max_abs_diff']:.3f} "
            f"(std {x['logit_std']:.2f}); top-1 = fp32: engine {x['engine_top1_agree']:.0%}, "
            f"transformers bf16 {x['hf_bf16_top1_agree']:.0%}; free-running greedy equal to fp32 for "
            f"{x['engine_greedy_match']} tokens"
        )
    results["correctness"] = rows


def matching_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


@torch.inference_mode()
def bench_llm_engine(path: Path, device, shape, args, results: dict) -> None:
    """The whole engine (scheduler, sampler, outputs) stepping real requests: start time with
    graph capture, ms per step at 1 and 32 rows, tokens/s with 128 concurrent requests."""
    from models.engine.llm_engine import LLMEngine
    from models.protocol.requests import GenerationRequest, SamplingParams

    max_batch = max(args.batch_sizes)
    max_len = args.prompt_len + args.new_tokens + 16
    config = EngineConfig(
        device=device.type, max_num_seqs=max_batch, max_model_len=max_len,
        num_kv_blocks=2 + max_batch * math.ceil(max_len / 16), max_num_batched_tokens=8192,
    )  # fmt: skip
    synchronize(device)
    t = time.perf_counter()
    eng = LLMEngine(config, path, tokenizer=None)
    synchronize(device)
    results["llm_engine_start_s"] = time.perf_counter() - t
    results["llm_engine_capture_s"] = eng.graph_capture_s
    log(f"LLMEngine start {results['llm_engine_start_s']:.1f} s (graph capture {eng.graph_capture_s:.1f} s)")
    gen = torch.Generator().manual_seed(3)
    counter = iter(range(1 << 30))

    def run(batch: int, new_tokens: int, profiler=None) -> tuple[float, float]:
        ids = {f"q{next(counter)}" for _ in range(batch)}
        for request_id in sorted(ids):
            prompt = torch.randint(2, shape["vocab_size"], (args.prompt_len,), generator=gen).tolist()
            params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
            eng.add_request(GenerationRequest(request_id, prompt, params))
        started: set[str] = set()
        while started != ids:  # until every request is prefilled: from here on, decode steps only
            started.update(out.request_id for out in eng.step() if out.token_ids)
        synchronize(device)
        if profiler is not None:
            profiler.enable()
        t, steps, tokens = time.perf_counter(), 0, eng.stats().generated_tokens
        while eng.has_unfinished():
            eng.step()
            steps += 1
        synchronize(device)
        if profiler is not None:
            profiler.disable()
        elapsed = time.perf_counter() - t
        return elapsed * 1000 / max(steps, 1), (eng.stats().generated_tokens - tokens) / elapsed

    for batch in (1, 32):
        if batch <= max_batch:
            ms, _ = run(batch, min(64, args.new_tokens))
            results[f"llm_engine_step_bs{batch}_ms"] = ms
            log(f"LLMEngine decode step bs {batch}: {ms:.3f} ms")
    ms, tok_s = run(max_batch, args.new_tokens)
    results["llm_engine_tok_s_128"], results["llm_engine_step_bs128_ms"] = tok_s, ms
    log(f"LLMEngine {max_batch} requests decoding: {tok_s:.0f} tok/s ({ms:.3f} ms/step)")
    if "profile" in args.sections:  # where the host time of a step goes
        import cProfile
        import io
        import pstats

        profiler = cProfile.Profile()
        run(max_batch, 16, profiler)
        for order in ("tottime", "cumulative"):
            text = io.StringIO()
            pstats.Stats(profiler, stream=text).sort_stats(order).print_stats(16)
            log(f"LLMEngine decode steps, 128 rows, host profile by {order}:\n" + text.getvalue()[-3500:])


# ----------------------------------------------------------------------------- report


def table(results: dict) -> str:
    def cell(key, fmt="{:.3f}"):
        value = results.get(key)
        return "—" if value is None else fmt.format(value)

    def verdict(key, higher_better=False):
        value, target = results.get(key), TARGETS[key]
        if value is None:
            return "not run"
        ok = value >= target if higher_better else value <= target
        return ("met" if ok else "MISSED") + f" (target {'≥' if higher_better else '≤'} {target:g})"

    lines = [
        "| what | bs 1 | bs 32 | verdict |",
        "|---|---|---|---|",
        f"| bandwidth floor: {cell('weight_gb', '{:.2f}')} GB weights / {cell('copy_bandwidth_tb_s', '{:.2f}')} TB/s copy (ms) "
        f"| {cell('floor_ms')} | {cell('floor_ms')} + KV | |",
        f"| transformers, static cache, CUDA graph (ms/step) | {cell('hf_bs1_ms')} | {cell('hf_bs32_ms')} | baseline |",
        f"| engine decode step, CUDA graph (ms) | {cell('step_bs1_ms')} | {cell('step_bs32_ms')} | "
        f"bs1 {verdict('step_bs1_ms')}; bs32 {verdict('step_bs32_ms')} |",
        f"| speed-up over transformers | {ratio(results, 'hf_bs1_ms', 'step_bs1_ms')} | "
        f"{ratio(results, 'hf_bs32_ms', 'step_bs32_ms')} | |",
        f"| engine, 128 sequences decoding (tok/s; ms/step) | | {cell('tok_s_128', '{:.0f}')} tok/s; "
        f"{cell('step_bs128_ms')} ms | {verdict('tok_s_128', True)} |",
        f"| steering on 4 layers, every row different (ms; % over plain) | | {cell('steer_ms')}; "
        f"{cell('steer_overhead_pct', '{:+.1f}')} % | {verdict('steer_overhead_pct')} |",
        f"| 8 LoRA adapters r16 on q/k/v/o/gate/up/down, mixed (ms; % over base) | | {cell('lora_ms')}; "
        f"{cell('lora_overhead_pct', '{:+.1f}')} % | {verdict('lora_overhead_pct')} |",
        f"| engine start: load {cell('engine_load_s', '{:.1f}')} s + graph capture "
        f"{cell('engine_capture_s', '{:.1f}')} s | {cell('engine_start_s', '{:.1f}')} s | | {verdict('engine_start_s')} |",
    ]
    lines += [
        f"| whole engine (scheduler, sampler, outputs): decode ms/step | {cell('llm_engine_step_bs1_ms')} | "
        f"{cell('llm_engine_step_bs32_ms')} | |",
        f"| whole engine, 128 requests decoding (tok/s; ms/step) | | "
        f"{cell('llm_engine_tok_s_128', '{:.0f}')} tok/s; {cell('llm_engine_step_bs128_ms')} ms | |",
        f"| whole engine start (LLMEngine(): load, KV, LoRA slots, capture {cell('llm_engine_capture_s', '{:.1f}')} s) "
        f"| {cell('llm_engine_start_s', '{:.1f}')} s | | |",
    ]
    for row in results.get("correctness", []):
        lines.append(
            f"| correctness, prompt {row['prompt_len']}, {row['of']} teacher-forced steps: max abs logit diff "
            f"to fp32 transformers: engine {row['engine_max_abs_diff']:.3f}, transformers bf16 "
            f"{row['hf_bf16_max_abs_diff']:.3f} (logit std {row['logit_std']:.2f}); top-1 equal to fp32: "
            f"engine {row['engine_top1_agree']:.0%}, transformers bf16 {row['hf_bf16_top1_agree']:.0%}; "
            f"free-running greedy tokens equal to fp32: {row['engine_greedy_match']}/{row['of']} | | | |"
        )
    return "\n".join(lines)


def ratio(results, base, new) -> str:
    if results.get(base) is None or results.get(new) is None:
        return "—"
    return f"{results[base] / results[new]:.1f}x"


def write_tuning_table(out: Path) -> None:
    """The matmul tuner's choices of this run, in the layout of the shipped tables: copy the
    file to models/engine/tuned/ to make a cold engine start skip the timing."""
    from models.engine.kernels.tuning import tuning_file_stem, tuning_table

    if not torch.cuda.is_available():
        return
    name = torch.cuda.get_device_name()
    table = {"device": name, "choices": tuning_table()}
    path = out / f"{tuning_file_stem(name)}.json"
    path.write_text(json.dumps(table, indent=1))
    log(f"tuner choices: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny model shape (CPU logic check)")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--steps", type=int, default=100, help="timed steps per measurement")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128])
    parser.add_argument("--sections", default="floor,kernels,hf,engine,correctness,llm_engine")
    parser.add_argument("--checkpoint", default="/tmp/tandem-bench-qwen3")
    parser.add_argument("--name", default=None, help="JSON file name")
    parser.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    args = parser.parse_args()
    device = torch.device(args.device)
    shape = SHAPES["tiny" if args.tiny else "qwen3-1.7b"]
    if args.tiny:
        args.prompt_len, args.new_tokens = min(args.prompt_len, 24), min(args.new_tokens, 8)
        args.batch_sizes = [b for b in args.batch_sizes if b <= 8] or [1]
        args.steps = min(args.steps, 3)
    sections = set(args.sections.split(","))
    results: dict = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                     "torch": torch.__version__, "shape": shape, "prompt_len": args.prompt_len,
                     "new_tokens": args.new_tokens, "targets": TARGETS}
    path = Path(args.checkpoint + ("-tiny" if args.tiny else ""))
    t = time.perf_counter()
    params = build_checkpoint(path, shape, device)
    log(f"checkpoint {params / 1e9:.3f} B params written to {path} in {time.perf_counter() - t:.1f} s")
    results["params"] = params
    results["weight_gb"] = params * 2 / 1e9
    if "floor" in sections:
        bw = copy_bandwidth(device)
        results["copy_bandwidth_tb_s"] = bw / 1e12
        results["floor_ms"] = params * 2 / bw * 1000
        log(f"copy bandwidth {bw / 1e12:.2f} TB/s, floor {results['floor_ms']:.3f} ms")
    if "kernels" in sections and "copy_bandwidth_tb_s" in results:
        bench_kernels(device, shape, results)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    hf_model = load_hf(path, device, dtype) if sections & {"hf", "correctness"} else None
    if "hf" in sections:
        for batch in (1, 32):
            try:
                results[f"hf_bs{batch}_ms"] = bench_transformers(
                    hf_model, min(batch, max(args.batch_sizes)), args.prompt_len,
                    args.prompt_len + args.new_tokens, device, args.steps,
                )  # fmt: skip
                log(f"transformers static cache + graph bs {batch}: {results[f'hf_bs{batch}_ms']:.3f} ms")
            except Exception as exc:  # the baseline failing must not hide the engine's numbers
                results[f"hf_bs{batch}_error"] = repr(exc)
                log(f"transformers bs {batch} failed: {exc!r}")
    bench = bench_engine(path, device, shape, args, results) if "engine" in sections else None
    if "correctness" in sections:
        if bench is None:
            max_len = args.prompt_len + args.new_tokens + 16
            bench = DecodeBench(make_runner(path, device, 4, max_len), 4, max_len)
        hf_fp32 = load_hf(path, device, torch.float32)
        check_correctness(
            bench, hf_model, hf_fp32, shape, device, results, args.prompt_len, min(32, args.new_tokens)
        )
        del hf_fp32
    del bench, hf_model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if "llm_engine" in sections:
        bench_llm_engine(path, device, shape, args, results)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = args.name or ("engine_gpu_tiny_cpu.json" if args.tiny else "engine_gpu.json")
    (out / name).write_text(json.dumps(results, indent=1))
    write_tuning_table(out)
    print()
    print(table(results))
    print(f"\nJSON: {out / name}")


if __name__ == "__main__":
    main()
