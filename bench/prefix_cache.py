"""Prefix caching: TTFT of a request whose first tokens repeat an earlier request's, with the
cache and without (two engines of one model, same run), and what n = 4 prefills.

Each measurement: a "warm" request (the shared prefix + its own tail) runs to completion, then
the measured request (the same prefix + another tail) is added and timed until its first token.
With the cache the second request finds the prefix's blocks and computes only its tail; without,
it prefills everything. Best of --repeats, the two engines alternating (the machines are noisy).
n = 4: four requests with one prompt added together; prompt tokens the engine computed.

- CPU (default): the built-in toy big model (float32). Its context is 1,024 tokens, so the
  shared prefix is 992 tokens (not the 2,000 of the GPU mode); target >= 3x.
- GPU (--gpu): a Qwen3-1.7B-shaped model with random bf16 weights (bench/engine_gpu.py builds
  it), a 2,000-token prefix; target >= 5x. Needs torch + CUDA + transformers + safetensors.

    python bench/prefix_cache.py                          # CPU: bench/results/prefix_cache_cpu.json
    PYTHONUNBUFFERED=1 python3 bench/prefix_cache.py --gpu --out $OUT     # prefix_cache_gpu.json
    python bench/prefix_cache.py --gpu --tiny --out /tmp  # the GPU mode's logic, on a CPU
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.engine.config import EngineConfig  # noqa: E402
from models.engine.llm_engine import LLMEngine  # noqa: E402
from models.protocol.requests import GenerationRequest, SamplingParams  # noqa: E402

TARGETS = {"cpu": 3.0, "gpu": 5.0}


def tokens(n: int, seed: int, vocab: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n,), generator=g).tolist()


def ttft_s(eng: LLMEngine, prompt: list[int], rid: str) -> float:
    """Seconds from add_request to the step that returns the request's first token."""
    params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    start = time.perf_counter()
    eng.add_request(GenerationRequest(rid, prompt, params))
    first = None
    while eng.has_unfinished():
        for out in eng.step():
            if out.request_id == rid and out.token_ids and first is None:
                first = time.perf_counter() - start
    return first


def repeated_prefix_ttft(
    eng: LLMEngine, prefix: list[int], tail: int, vocab: int, round_: int
) -> float:
    """TTFT of prefix + a new tail, right after prefix + another tail ran."""
    warm = prefix + tokens(tail, 1000 + 2 * round_, vocab)
    ttft_s(eng, warm, f"warm{round_}-{tail}")
    return ttft_s(eng, prefix + tokens(tail, 1001 + 2 * round_, vocab), f"timed{round_}-{tail}")


def n4_prefilled(eng: LLMEngine, prompt: list[int]) -> tuple[int, float]:
    """Prompt tokens computed for four requests of one prompt added together, and seconds."""
    counted, inner = [0], eng.runner.run

    def run_step(scheduled, *args):
        counted[0] += sum(
            min(item.num_tokens, item.seq.num_prompt_tokens - item.seq.num_computed)
            for item in scheduled
            if item.seq.num_computed < item.seq.num_prompt_tokens
        )
        return inner(scheduled, *args)

    eng.runner.run = run_step
    start = time.perf_counter()
    for i in range(4):
        params = SamplingParams(max_tokens=1, seed=i, ignore_eos=True)
        eng.add_request(GenerationRequest(f"n4-{i}-{time.perf_counter_ns()}", prompt, params))
    while eng.has_unfinished():
        eng.step()
    seconds = time.perf_counter() - start
    eng.runner.run = inner
    return counted[0], seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true", help="Qwen3-1.7B shape on CUDA")
    parser.add_argument("--tiny", action="store_true", help="with --gpu: tiny shape (logic check)")
    parser.add_argument("--prefix", type=int, default=None, help="shared prefix tokens")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--tails",
        default="16,1",
        help="tokens after the prefix, per case (the first is the "
        "headline; 1 makes the cached step decode-shaped: a CUDA graph on the GPU)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (CPU)")
    parser.add_argument("--checkpoint", default="/tmp/tandem-bench-qwen3")
    parser.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    args = parser.parse_args()
    mode = "gpu" if args.gpu else "cpu"
    if args.gpu:
        from bench.engine_gpu import SHAPES, build_checkpoint

        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        path = Path(args.checkpoint + ("-tiny" if args.tiny else ""))
        build_checkpoint(path, SHAPES["tiny" if args.tiny else "qwen3-1.7b"], device)
        model_name = ("tiny" if args.tiny else "Qwen3-1.7B") + " shape, random bf16 weights, "
        model_name += torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
        prefix_len = args.prefix or 2000
        config = {"num_kv_blocks": 1024, "max_adapters_per_replica": 0, "device": device.type}
    else:
        from models.builtin import TOY_DIR

        torch.set_num_threads(args.threads)
        path = TOY_DIR / "big"
        model_name = f"built-in toy big model, float32, CPU, {args.threads} thread(s)"
        prefix_len = args.prefix or 992  # its context is 1,024 tokens
        config = {"num_kv_blocks": 512, "max_adapters_per_replica": 0, "device": "cpu"}
    engines = {
        cache: LLMEngine(EngineConfig(prefix_caching=cache, **config), path)
        for cache in (False, True)
    }
    vocab = engines[True].args.vocab_size
    prefix = tokens(prefix_len, 0, vocab)
    tails = [int(t) for t in args.tails.split(",")]
    for eng in engines.values():  # warm-up: kernels, allocator, the cached path once
        for tail in tails:
            repeated_prefix_ttft(eng, prefix[: prefix_len // 2], tail, vocab, -1)
    cases = []
    for tail in tails:
        best = {False: float("inf"), True: float("inf")}
        for r in range(args.repeats):
            for cache, eng in engines.items():
                # a new prefix per round: the cache engine's warm request really fills the cache
                p = tokens(prefix_len, 10 + r + 100 * tail, vocab)
                best[cache] = min(best[cache], repeated_prefix_ttft(eng, p, tail, vocab, r))
        cases.append({"tail_tokens": tail, "ttft_ms_no_cache": round(best[False] * 1e3, 2),
                      "ttft_ms_cached": round(best[True] * 1e3, 2),
                      "speedup": round(best[False] / best[True], 2)})  # fmt: skip
    n4 = {cache: n4_prefilled(eng, tokens(prefix_len, 99, vocab)) for cache, eng in engines.items()}
    results = {
        "model": model_name,
        "prefix_tokens": prefix_len,
        "repeats": args.repeats,
        **cases[0],
        "target_speedup": TARGETS[mode],
        "cases": cases,
        "n4_prompt_tokens_computed_no_cache": n4[False][0],
        "n4_prompt_tokens_computed_cached": n4[True][0],
        "n4_seconds_no_cache": round(n4[False][1], 3),
        "n4_seconds_cached": round(n4[True][1], 3),
        "hit_rate": round(engines[True].stats().prefix_cache_hit_rate, 3),
    }
    print(f"{model_name}; shared prefix {prefix_len} tokens")
    print(f"{'':<34}{'no cache':>12}{'cached':>12}{'ratio':>8}")
    for c in cases:
        label = f"TTFT, {c['tail_tokens']}-token tail (ms)"
        print(f"{label:<34}{c['ttft_ms_no_cache']:>12}{c['ttft_ms_cached']:>12}{c['speedup']:>8}")
    print(f"target >= {TARGETS[mode]}x on the first case")
    print(f"{'n=4: prompt tokens computed':<34}{n4[False][0]:>12}{n4[True][0]:>12}"
          f"{n4[False][0] / max(n4[True][0], 1):>8.2f}")  # fmt: skip
    print(f"{'n=4: seconds':<34}{n4[False][1]:>12.3f}{n4[True][1]:>12.3f}"
          f"{n4[False][1] / n4[True][1]:>8.2f}")  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    file = out / f"prefix_cache_{mode}.json"
    file.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {file}")


if __name__ == "__main__":
    main()
