"""Decode matmuls on one GPU: cuBLAS against every skinny-GEMM config the engine may pick.

For each projection of the Qwen3-1.7B and Qwen3-0.6B shapes (the big and small model of the
steering benchmark) at 1 to 32 rows, times cuBLAS and each Triton skinny-GEMM config
(`models.engine.kernels.skinny_gemm.SKINNY_CONFIGS`, plus the split-K ones where the engine
accepts partial sums) the way the engine's start-up tuner does, and prints which wins, at what
share of copy bandwidth. Shows where a decode step's matmul time goes and whether the candidate list covers
each shape. Writes JSON.

    PYTHONUNBUFFERED=1 python3 bench/skinny_gemm.py --out $OUT      # H200
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

from models.engine.kernels import tuning  # noqa: E402
from models.engine.kernels.skinny_gemm import linear_configs  # noqa: E402

# (name, out, in, kind): kind "partials" = the engine calls it through linear_partials,
# "gated" = through silu_mul_linear (gate_up and silu(gate) * up in one kernel; cuBLAS is timed
# with the separate silu-and-mul kernel)
PROJECTIONS = {
    "qwen3-1.7b": [("qkv", 4096, 2048, "plain"), ("o", 2048, 2048, "partials"),
                   ("gate_up", 12288, 2048, "gated"), ("down", 2048, 6144, "partials")],
    "qwen3-0.6b": [("qkv", 4096, 1024, "plain"), ("o", 1024, 2048, "partials"),
                   ("gate_up", 6144, 1024, "gated"), ("down", 1024, 3072, "partials")],
}  # fmt: skip


def copy_bandwidth() -> float:
    """Bytes/s of a 1 GiB device-to-device copy (read + write counted)."""
    src = torch.empty(1 << 29, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        dst.copy_(src)
    torch.cuda.synchronize()
    return 2 * src.numel() * 2 * 10 / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 16, 32])
    parser.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    args = parser.parse_args()
    bandwidth = copy_bandwidth()
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s", flush=True)
    results = {"device": torch.cuda.get_device_name(), "copy_tb_s": bandwidth / 1e12, "rows": []}
    header = f"{'model':<11} {'proj':<8} {'rows':>4} {'MB':>6} {'cuBLAS us':>10} " \
             f"{'best us':>8} {'% bw':>5}  best config"  # fmt: skip
    lines = [header, "-" * len(header)]
    for model, projections in PROJECTIONS.items():
        for name, n_out, n_in, kind in projections:
            weight = torch.randn(n_out, n_in, device="cuda", dtype=torch.bfloat16)
            gated = kind == "gated"
            configs = linear_configs(kind == "partials", gated)
            for rows in args.rows:
                times = tuning.time_linear_configs(rows, weight, None, configs, gated)
                cublas = times[None]
                best = min(times, key=times.get)
                nbytes = weight.numel() * 2
                pct = 100 * nbytes / (times[best] * 1e-3) / bandwidth
                results["rows"].append({
                    "model": model, "proj": name, "kind": kind, "rows": rows,
                    "weight_mb": nbytes / 1e6,
                    "cublas_us": cublas * 1e3, "best_us": times[best] * 1e3,
                    "best_config": best, "pct_copy_bw": pct,
                    "all_us": {str(c): round(t * 1e3, 2) for c, t in times.items()},
                })  # fmt: skip
                line = (f"{model:<11} {name:<8} {rows:>4} {nbytes / 1e6:>6.1f} "
                        f"{cublas * 1e3:>10.2f} {times[best] * 1e3:>8.2f} {pct:>5.0f}  "
                        f"{'cuBLAS' if best is None else best}")  # fmt: skip
                print(line, flush=True)
                lines.append(line)
            del weight
    print("\n".join(lines))
    out = Path(args.out) / "skinny_gemm.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
