"""Steering benchmark: what the small model in the loop costs the big model's decode step.

`gpu`: in-process, one GPU, no Ray. Qwen3-1.7B-shaped big model and Qwen3-0.6B-shaped small
model with random bf16 weights (speed does not depend on the values) and a random rank-16
expert LoRA on the small model. The torch engine decodes B streams; per-step time is compared,
in the same run, between unsteered, a static steering vector on 4 layers, and proxy tuning
colocated (the engine waits each step for the small model's base + expert forward). Targets:
vector <= 1.03x, proxy tuning colocated <= 1.5x.

`serve`: tokens/s of 16 concurrent streams through the running app's HTTP API (openai client,
`extra_body={"steering": ...}`): unsteered vs async vs sync vs colocated.

    PYTHONUNBUFFERED=1 python3 bench/steering.py gpu --out $OUT             # H200
    python bench/steering.py gpu --tiny --device cpu                         # logic check
    python bench/steering.py serve --base-url http://127.0.0.1:8000 --policy proxy
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.protocol.steering import StepObserver  # noqa: E402

SHAPES = {
    "qwen3-1.7b": dict(hidden_size=2048, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, intermediate_size=6144,
                       vocab_size=151936),
    "qwen3-0.6b": dict(hidden_size=1024, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, intermediate_size=3072,
                       vocab_size=151936),
    "tiny-big": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=32, intermediate_size=256, vocab_size=512),
    "tiny-small": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, intermediate_size=128, vocab_size=512),
}  # fmt: skip
TARGETS = {"vector_ratio": 1.03, "proxy_colocated_ratio": 1.5}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---- GPU, in process --------------------------------------------------------------------------


def write_lora(path: Path, shape: dict, rank: int = 16, seed: int = 2) -> Path:
    """A PEFT LoRA directory with random non-zero A and B on q/k/v/o of every layer."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    h, d = shape["hidden_size"], shape["head_dim"]
    outs = {"q_proj": shape["num_attention_heads"] * d, "k_proj": shape["num_key_value_heads"] * d,
            "v_proj": shape["num_key_value_heads"] * d, "o_proj": h}  # fmt: skip
    ins = {"q_proj": h, "k_proj": h, "v_proj": h, "o_proj": shape["num_attention_heads"] * d}
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(shape["num_hidden_layers"]):
        for name, out in outs.items():
            key = f"base_model.model.model.layers.{i}.self_attn.{name}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, ins[name], generator=g) * 0.02
            tensors[f"{key}.lora_B.weight"] = torch.randn(out, rank, generator=g) * 0.02
    save_file({k: v.to(torch.bfloat16) for k, v in tensors.items()},
              str(path / "adapter_model.safetensors"))  # fmt: skip
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank,
              "target_modules": list(outs), "bias": "none"}  # fmt: skip
    (path / "adapter_config.json").write_text(json.dumps(config))
    return path


class AsyncObserver(StepObserver):
    """The runtime behind a coroutine, as the engine sees a remote Steerer."""

    def __init__(self, runtime):
        self.runtime = runtime

    async def on_step(self, rows):
        return await self.runtime.process(rows)


def decode_step_ms(engine, requests, warmup_steps: int = 3) -> tuple[float, int]:
    """Median ms per engine step once every request is decoding; and the steps measured."""
    for request in requests:
        engine.add_request(request)
    times = []
    step = 0
    while engine.has_unfinished():
        start = time.perf_counter()
        engine.step()
        if step >= warmup_steps:
            times.append((time.perf_counter() - start) * 1000)
        step += 1
    return statistics.median(times), len(times)


def bench_gpu(args) -> dict:
    from bench.engine_gpu import build_checkpoint
    from models.engine.config import EngineConfig
    from models.engine.llm_engine import LLMEngine
    from models.protocol.requests import GenerationRequest, SamplingParams, SteerVectorSpec
    from models.protocol.steering import SteeringRequest
    from models.steering.config import SteeringConfig
    from models.steering.runtime import SteeringRuntime

    device = torch.device(args.device)
    big_shape = SHAPES["tiny-big" if args.tiny else "qwen3-1.7b"]
    small_shape = SHAPES["tiny-small" if args.tiny else "qwen3-0.6b"]
    work = Path(args.work)
    t = time.perf_counter()
    big = work / "big"
    small = work / "small"
    build_checkpoint(big, big_shape, device, seed=0)
    build_checkpoint(small, small_shape, device, seed=1)
    expert = write_lora(work / "expert", small_shape)
    log(f"checkpoints ready in {time.perf_counter() - t:.1f} s")

    max_batch = max(args.batch_sizes)
    max_len = args.prompt_len + args.new_tokens + 16
    engine_config = EngineConfig(
        device=device.type, max_num_seqs=max_batch, max_model_len=max_len,
        num_kv_blocks=1 + max_batch * (-(-max_len // 16)) * 2,
    )  # fmt: skip
    t = time.perf_counter()
    engine = LLMEngine(engine_config, big, tokenizer=None)  # captures its CUDA graphs
    log(f"engine ready in {time.perf_counter() - t:.1f} s")
    layers = big_shape["num_hidden_layers"]
    g = torch.Generator().manual_seed(3)
    engine.register_vector("v", torch.randn(layers, big_shape["hidden_size"], generator=g) * 0.05)
    steer_layers = list(range(layers // 2 - 2, layers // 2 + 2))

    steering = SteeringConfig(
        expert_adapter="expert",
        device=device.type,
        kv_cache_gib=2.0 if device.type == "cuda" else 0.1,
        policies=[{"name": "proxy", "kind": "proxy_tuning", "params": {"alpha": 1.0}},
                  {"name": "contrast", "kind": "contrastive"}],
    )  # fmt: skip
    t = time.perf_counter()
    runtime = SteeringRuntime(
        steering, str(big), str(small), {"expert": str(expert)}, max_model_len=max_len
    )  # the small model reads what the big one does (as the Generator configures it)
    log(f"steering runtime ready in {time.perf_counter() - t:.1f} s")
    # colocated: the runtime answers in the engine thread; async: its coroutine runs on
    # another thread while the engine goes on (as a remote Steerer would)
    observers = {"colocated": runtime, "async": AsyncObserver(runtime)}

    results: dict = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                     "big": "tiny-big" if args.tiny else "qwen3-1.7b",
                     "small": "tiny-small" if args.tiny else "qwen3-0.6b",
                     "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "rows": []}  # fmt: skip
    vocab = big_shape["vocab_size"]
    modes = {
        "unsteered": {},
        "vector_4_layers": {"steer_vectors": [SteerVectorSpec("v", 1.0, steer_layers)]},
        "proxy_colocated": {"steering": SteeringRequest("proxy", mode="colocated")},
        "contrastive_colocated": {"steering": SteeringRequest("contrast", mode="colocated")},
        "proxy_async": {"steering": SteeringRequest("proxy", mode="async")},
        # steering.read_ahead (opt-in): a guessed next token read in the background
        "proxy_colocated_read_ahead": {"steering": SteeringRequest("proxy", mode="colocated")},
        "contrastive_colocated_read_ahead": {
            "steering": SteeringRequest("contrast", mode="colocated")
        },
    }
    if args.modes:
        modes = {m: modes[m] for m in ["unsteered", *args.modes]}
    for batch in args.batch_sizes:
        prompts = torch.randint(2, vocab, (batch, args.prompt_len), generator=g).tolist()
        row = {"batch": batch}
        for repeat in range(args.repeats):
            for mode, extra in modes.items():
                params = SamplingParams(max_tokens=args.new_tokens, temperature=0, ignore_eos=True)
                reqs = [GenerationRequest(f"{mode}-{batch}-{repeat}-{i}", p, params, **extra)
                        for i, p in enumerate(prompts)]  # fmt: skip
                mode_name = (extra.get("steering") or {}).get("mode", "colocated")
                engine.set_step_observer(observers[mode_name])
                runtime.config.read_ahead = mode.endswith("_read_ahead")
                ms, steps = decode_step_ms(engine, reqs)
                runtime.release([r.request_id for r in reqs])
                row[f"{mode}_ms"] = min(ms, row.get(f"{mode}_ms", float("inf")))
                log(f"bs {batch} {mode}: {ms:.3f} ms/step ({steps} steps)")
        if args.trace and batch == max(args.batch_sizes) and device.type == "cuda":
            engine.set_step_observer(runtime)
            runtime.config.read_ahead = False
            params = SamplingParams(max_tokens=args.new_tokens, temperature=0, ignore_eos=True)
            steer = {"steering": SteeringRequest("proxy", mode="colocated")}
            reqs = [GenerationRequest(f"trace-{i}", p, params, **steer)
                    for i, p in enumerate(prompts)]  # fmt: skip
            trace_steps(engine, reqs, Path(args.out) / "steering_trace.json")
            runtime.release([r.request_id for r in reqs])
        row.update(small_read_ms(runtime.small_model, prompts, device, profile=args.profile))
        log(f"bs {batch} small model alone: {row}")
        base = row["unsteered_ms"]
        for mode in modes:
            if mode != "unsteered":
                row[f"{mode}_ratio"] = round(row[f"{mode}_ms"] / base, 3)
        results["rows"].append(row)
    stats = runtime.stats()
    results["read_ahead_hits"], results["read_ahead_misses"] = (
        stats.read_ahead_hits, stats.read_ahead_misses)  # fmt: skip
    return results


def trace_steps(engine, requests, path: Path, steps: int = 3) -> None:
    """A Chrome trace (host and GPU) of a few decode steps once every request is decoding."""
    from torch.profiler import ProfilerActivity, profile

    for request in requests:
        engine.add_request(request)
    for _ in range(6):
        engine.step()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
    prof.export_chrome_trace(str(path))
    log(f"trace of {steps} steps: {path}")
    while engine.has_unfinished():
        engine.step()


def small_read_ms(
    small, prompts: list[list[int]], device: torch.device, steps: int = 32, profile: bool = False
) -> dict:
    """ms per decode step of the small model alone: base rows, and base + expert rows."""
    from models.steering.state import BASE, RequestState

    out = {}
    for name, variants in (("small_base", [BASE]), ("small_base_expert", [BASE, "expert"])):
        states = [RequestState(f"{name}-{i}", None) for i in range(len(prompts))]
        for state, prompt in zip(states, prompts, strict=True):
            state.reset(prompt, [])
        items = [(s, v) for s in states for v in variants]
        small.read(items)
        times = []
        for step in range(steps):
            for state in states:
                state.set_generated(step, [7])
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            small.read(items)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append((time.perf_counter() - start) * 1000)
        out[f"{name}_read_ms"] = statistics.median(times)
        if profile and device.type == "cuda":
            out[f"{name}_profile"] = profile_read(small, items, states, steps)
        for state in states:
            small.free(state)
    return out


def profile_read(small, items, states, step: int, reads: int = 5) -> list[dict]:
    """GPU time per kernel name of one small-model read (profiler), largest first."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(reads):
            for state in states:
                state.set_generated(step + i, [7])
            small.read(items)
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        us = getattr(e, "device_time_total", 0) or getattr(e, "cuda_time_total", 0)
        if us > 0:
            rows.append({"kernel": e.key[:80], "per_read": e.count / reads, "us": us / reads})
    rows.sort(key=lambda r: -r["us"])
    log(f"small-model read, {len(items)} rows: {sum(r['us'] for r in rows):.0f} us of kernels")
    for r in rows[:8]:
        log(f"   {r['us']:8.1f} us  x{r['per_read']:5.0f}  {r['kernel']}")
    return rows[:20]


def print_gpu_table(results: dict) -> None:
    modes = [k[:-3] for k in results["rows"][0] if k.endswith("_ms") and not k.startswith("small_")]
    print(f"\nsteering cost per decode step, {results['big']} + {results['small']} "
          f"on {results['device']} (ms/step, ratio to unsteered)")  # fmt: skip
    print("| batch | " + " | ".join(modes) + " |")
    print("|---|" + "---|" * len(modes))
    for row in results["rows"]:
        cells = [f"{row[m + '_ms']:.2f}" + ("" if m == "unsteered" else f" ({row[m + '_ratio']:.2f}x)")
                 for m in modes]  # fmt: skip
        print(f"| {row['batch']} | " + " | ".join(cells) + " |")
    for row in results["rows"]:
        print(f"bs {row['batch']}: small model alone {row['small_base_read_ms']:.2f} ms (base), "
              f"{row['small_base_expert_read_ms']:.2f} ms (base + expert LoRA rows)")  # fmt: skip
    print(f"targets: {TARGETS}; read-ahead guesses: {results['read_ahead_hits']} hit, "
          f"{results['read_ahead_misses']} missed")  # fmt: skip


# ---- through the HTTP API ---------------------------------------------------------------------


async def one_stream(client, model: str, i: int, max_tokens: int, steering: dict | None):
    start = time.perf_counter()
    extra = {"ignore_eos": True}
    if steering:
        extra["steering"] = steering
    stream = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": f"Tell me about Mia, part {i}."}],
        max_tokens=max_tokens, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body=extra,
    )  # fmt: skip
    tokens, interventions = 0, 0
    async for chunk in stream:
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
        tandem = (chunk.model_extra or {}).get("tandem") or {}
        interventions += len(tandem.get("interventions") or [])
    return tokens, interventions, time.perf_counter() - start


async def bench_serve_mode(args, steering: dict | None) -> dict:
    import openai

    async with openai.AsyncOpenAI(base_url=f"{args.base_url}/v1", api_key=args.api_key,
                                  max_retries=0, timeout=600) as client:  # fmt: skip
        start = time.perf_counter()
        results = await asyncio.gather(*(one_stream(client, args.model, i, args.max_tokens,
                                                    steering) for i in range(args.streams)))  # fmt: skip
        wall = time.perf_counter() - start
    tokens = sum(r[0] for r in results)
    return {"tokens": tokens, "seconds": round(wall, 3), "tokens_per_s": round(tokens / wall, 1),
            "interventions": sum(r[1] for r in results)}  # fmt: skip


def bench_serve(args) -> dict:
    modes = {"unsteered": None}
    for mode in ("async", "sync", "colocated"):
        modes[mode] = {"policy": args.policy, "mode": mode}
    out: dict = {"base_url": args.base_url, "streams": args.streams, "max_tokens": args.max_tokens,
                 "policy": args.policy, "modes": {}}  # fmt: skip
    asyncio.run(bench_serve_mode(args, None))  # warm-up
    for name, steering in modes.items():
        out["modes"][name] = asyncio.run(bench_serve_mode(args, steering))
        log(f"{name}: {out['modes'][name]}")
    base = out["modes"]["unsteered"]["tokens_per_s"]
    for row in out["modes"].values():
        row["ratio_to_unsteered"] = round(row["tokens_per_s"] / base, 3) if base else None
    return out


def print_serve_table(results: dict) -> None:
    print(f"\n{results['streams']} concurrent streams x {results['max_tokens']} tokens, "
          f"policy '{results['policy']}' (tokens/s through HTTP)")  # fmt: skip
    print("| mode | tokens/s | ratio | interventions |")
    print("|---|---|---|---|")
    for name, row in results["modes"].items():
        print(f"| {name} | {row['tokens_per_s']} | {row['ratio_to_unsteered']} | "
              f"{row['interventions']} |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="part", required=True)
    gpu = sub.add_parser("gpu", help="in-process step time on one device")
    gpu.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    gpu.add_argument("--tiny", action="store_true", help="tiny shapes (logic check on CPU)")
    gpu.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    gpu.add_argument("--prompt-len", type=int, default=128)
    gpu.add_argument("--new-tokens", type=int, default=64)
    gpu.add_argument("--repeats", type=int, default=2)
    gpu.add_argument("--modes", nargs="*", help="modes to time beside unsteered (default all)")
    gpu.add_argument("--work", default="/tmp/tandem-steering-bench")
    gpu.add_argument("--profile", action="store_true", help="kernel times of a small-model read")
    gpu.add_argument("--trace", action="store_true",
                     help="Chrome trace of proxy-tuning steps at the largest batch (to --out)")  # fmt: skip
    gpu.add_argument("--out", default=str(ROOT / "bench" / "results"))
    serve = sub.add_parser("serve", help="tokens/s through the running app's HTTP API")
    serve.add_argument("--base-url", default="http://127.0.0.1:8000")
    serve.add_argument("--api-key", default="unused")
    serve.add_argument("--model", default="tandem")
    serve.add_argument("--policy", default="proxy", help="a policy of the app's config")
    serve.add_argument("--streams", type=int, default=16)
    serve.add_argument("--max-tokens", type=int, default=32)
    serve.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.part == "gpu":
        results = bench_gpu(args)
        name = "steering_gpu_tiny.json" if args.tiny else "steering_gpu.json"
        print_gpu_table(results)
    else:
        results = bench_serve(args)
        name = "steering_serve.json"
        print_serve_table(results)
    (out / name).write_text(json.dumps(results, indent=1))
    log(f"wrote {out / name}")
    if args.part == "gpu":
        from bench.engine_gpu import write_tuning_table

        write_tuning_table(out)


if __name__ == "__main__":
    main()
