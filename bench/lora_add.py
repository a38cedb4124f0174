"""The per-row LoRA at decode shapes: `lora_add_` by launch config, and the LoRA fused
into the skinny GEMM (`lora_linear`) against the linear plus `lora_add_`.

For the projections of the Qwen3-0.6B shape (the steering bench's small model, whose proxy-tuning
expert is a LoRA) and the Qwen3-1.7B shape, at 2 and 32 tokens with one row in two (or every
row) on an adapter, times each (BLOCK_K, BLOCK_OUT, num_warps, num_stages) in a CUDA graph of 28
calls (one per layer) and prints microseconds per call (JSON key "rows"). Then, at 2/16/32
tokens, each projection as the engine calls it (qkv plain, o and down as split-K partial sums,
gate_up gated): the linear without LoRA, linear + lora_add_ (+ silu-and-mul), and the fastest
fused config, timed by the engine's tuner (key "fused"). Writes JSON.

    PYTHONUNBUFFERED=1 python3 bench/lora_add.py --out $OUT      # H200
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.engine_gpu import graph_ms  # noqa: E402
from models.engine.kernels import tuning  # noqa: E402
from models.engine.kernels.lora import LORA_CONFIG, RowLoRA, lora_add_  # noqa: E402
from models.engine.kernels.skinny_gemm import fused_lora_configs, linear_configs  # noqa: E402

# (name, in, parts): the engine's fused projections
SHAPES = {
    "qwen3-0.6b": [("qkv", 1024, [2048, 1024, 1024]), ("o", 2048, [1024]),
                   ("gate_up", 1024, [3072, 3072]), ("down", 3072, [1024])],
    "qwen3-1.7b": [("qkv", 2048, [2048, 1024, 1024]), ("o", 2048, [2048]),
                   ("gate_up", 2048, [6144, 6144]), ("down", 6144, [2048])],
}  # fmt: skip
CONFIGS = list(itertools.product([256, 1024], [128, 256], [4], [3], [264, 1024, 2048]))
KINDS = {"qkv": "plain", "o": "partials", "gate_up": "gated", "down": "partials"}  # engine's calls


def graph_us(fn) -> float:
    """Microseconds per call: 28 calls (one per layer) in one CUDA graph."""
    return graph_ms(fn, torch.device("cuda"), calls=28, replays=20) * 1000


def time_fused(slots: int, rank: int) -> tuple[list[dict], list[str]]:
    """Per projection and token count: µs per call of the linear alone, linear + lora_add_ and
    the fused kernel's best config (the engine tuner's timings: weight copies streamed from HBM,
    one row in two on an adapter)."""
    rows, lines = [], []
    header = (f"{'model':<11} {'proj':<8} {'tokens':>6} {'no LoRA':>8} {'unfused':>8} "
              f"{'fused':>8} {'ratio':>6}  best fused config")  # fmt: skip
    lines += [header, "-" * len(header)]
    for model, projections in SHAPES.items():
        for name, k_dim, parts in projections:
            gated, partials = KINDS[name] == "gated", KINDS[name] == "partials"
            weight = torch.randn(sum(parts), k_dim, device="cuda", dtype=torch.bfloat16) * 0.02
            width = slots * len(parts) * rank
            a = torch.randn(k_dim, width, device="cuda", dtype=torch.bfloat16) * 0.02
            b = torch.randn(width, sum(parts), device="cuda", dtype=torch.bfloat16) * 0.02
            for tokens in (2, 16, 32):
                weights = torch.zeros(tokens, slots, device="cuda", dtype=torch.bfloat16)
                token_rows = torch.arange(tokens, device="cuda")
                lora = RowLoRA(a, b, weights, token_rows, parts, rank)
                configs = fused_lora_configs(weight, None, lora, partials, gated)
                times = tuning.time_linear_configs(
                    tokens, weight, None, configs, gated, lora, partials
                )
                unfused = times.pop(None) * 1000
                best = min(times, key=times.get) if times else None
                fused = times[best] * 1000 if best else float("nan")
                plain = tuning.time_linear_configs(
                    tokens, weight, None, linear_configs(partials, gated), gated
                )
                alone = min(plain.values()) * 1000
                line = (f"{model:<11} {name:<8} {tokens:>6} {alone:8.2f} {unfused:8.2f} "
                        f"{fused:8.2f} {fused / unfused:6.2f}  {best}")  # fmt: skip
                print(line, flush=True)
                lines.append(line)
                all_us = {str(c): round(t * 1000, 2) for c, t in times.items()}
                rows.append({"model": model, "proj": name, "kind": KINDS[name], "tokens": tokens,
                             "no_lora_us": alone, "unfused_us": unfused, "fused_us": fused,
                             "best_fused": best, "all_fused_us": all_us})  # fmt: skip
    return rows, lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slots", type=int, default=1)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    args = parser.parse_args()
    rows, lines = [], []
    for model, projections in SHAPES.items():
        for name, k_dim, parts in projections:
            width = args.slots * len(parts) * args.rank
            a = torch.randn(k_dim, width, device="cuda", dtype=torch.bfloat16) * 0.02
            b = torch.randn(width, sum(parts), device="cuda", dtype=torch.bfloat16) * 0.02
            for tokens in (2, 32):
                x = torch.randn(tokens, k_dim, device="cuda", dtype=torch.bfloat16)
                y = torch.zeros(tokens, sum(parts), device="cuda", dtype=torch.bfloat16)
                weights = torch.zeros(tokens, args.slots, device="cuda", dtype=torch.bfloat16)
                weights[1::2, 0] = 1.0  # proxy tuning: base and expert rows side by side
                token_rows = torch.arange(tokens, device="cuda")
                call = functools.partial(
                    lora_add_, y, x, a, b, weights, token_rows, parts, args.rank
                )
                times = {c: graph_us(functools.partial(call, config=c)) for c in CONFIGS}
                default = (
                    times[LORA_CONFIG] if LORA_CONFIG in times else graph_us(call)
                )
                best = min(times, key=times.get)
                line = (f"{model:<11} {name:<8} tokens {tokens:>3}: default {default:6.2f} us, "
                        f"best {times[best]:6.2f} us {best}")  # fmt: skip
                print(line, flush=True)
                lines.append(line)
                rows.append({"model": model, "proj": name, "tokens": tokens,
                             "default_us": default, "best_us": times[best], "best": best,
                             "all_us": {str(c): round(t, 2) for c, t in times.items()}})  # fmt: skip
    fused, fused_lines = time_fused(args.slots, args.rank)
    print("\n".join(lines))
    print(f"\nLoRA ({args.slots} slot(s) of rank {args.rank}) inside the skinny GEMM vs linear + "
          "lora_add_, us per call:")  # fmt: skip
    print("\n".join(fused_lines))
    out = Path(args.out) / "lora_add.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"device": torch.cuda.get_device_name(), "rows": rows, "fused": fused}
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
