"""The per-row LoRA kernel (`kernels.lora_add_`) at decode shapes, by launch config.

For the projections of the Qwen3-0.6B shape (the steering bench's small model, whose proxy-tuning
expert is a LoRA) and the Qwen3-1.7B shape, at 2 and 32 tokens with one row in two (or every
row) on an adapter, times each (BLOCK_K, BLOCK_OUT, num_warps, num_stages) in a CUDA graph of 28
calls (one per layer) and prints microseconds per call. Writes JSON.

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
from models.engine import kernels  # noqa: E402

# (name, in, parts): the engine's fused projections
SHAPES = {
    "qwen3-0.6b": [("qkv", 1024, [2048, 1024, 1024]), ("o", 2048, [1024]),
                   ("gate_up", 1024, [3072, 3072]), ("down", 3072, [1024])],
    "qwen3-1.7b": [("qkv", 2048, [2048, 1024, 1024]), ("o", 2048, [2048]),
                   ("gate_up", 2048, [6144, 6144]), ("down", 6144, [2048])],
}  # fmt: skip
CONFIGS = list(itertools.product([256, 1024], [128, 256], [4], [3], [264, 1024, 2048]))


def graph_us(fn) -> float:
    """Microseconds per call: 28 calls (one per layer) in one CUDA graph."""
    return graph_ms(fn, torch.device("cuda"), calls=28, replays=20) * 1000


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
                    kernels.lora_add_, y, x, a, b, weights, token_rows, parts, args.rank
                )
                times = {c: graph_us(functools.partial(call, config=c)) for c in CONFIGS}
                default = (
                    times[kernels.LORA_CONFIG] if kernels.LORA_CONFIG in times else graph_us(call)
                )
                best = min(times, key=times.get)
                line = (f"{model:<11} {name:<8} tokens {tokens:>3}: default {default:6.2f} us, "
                        f"best {times[best]:6.2f} us {best}")  # fmt: skip
                print(line, flush=True)
                lines.append(line)
                rows.append({"model": model, "proj": name, "tokens": tokens,
                             "default_us": default, "best_us": times[best], "best": best,
                             "all_us": {str(c): round(t, 2) for c, t in times.items()}})  # fmt: skip
    print("\n".join(lines))
    out = Path(args.out) / "lora_add.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
