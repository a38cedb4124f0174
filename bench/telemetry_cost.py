"""What Tandem's metric recording costs per engine output, in-process, with Ray's real metric
objects (a local Ray is started so records go where a replica's go): one request's stream of
single-token outputs iterated bare, through the Generator's recorder (`watch`: inter-token
time, interventions, engine time) and through the Ingress's (`metered`: TTFT, e2e, tokens),
best of `--repeats`. The served path costs about 0.3 ms of CPU per streamed chunk (README,
bench/serve_path.py); this prints what recording adds per output next to it and writes
bench/results/telemetry_cost.json.

    .venv/bin/python bench/telemetry_cost.py [--outputs 20000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from deployments.telemetry import GeneratorTelemetry, metered  # noqa: E402
from models.config import TandemConfig  # noqa: E402
from models.protocol.outputs import RequestOutput  # noqa: E402
from models.protocol.requests import GenerationRequest  # noqa: E402


async def outputs(n: int):
    for i in range(n):
        yield RequestOutput("r-0", [5], "a", finished=i == n - 1, finish_reason="length",
                            num_prompt_tokens=8, num_generated_tokens=i + 1)  # fmt: skip


async def bare(n: int, _request: GenerationRequest):
    return [o async for o in outputs(n)]


async def watched(request: GenerationRequest, telemetry: GeneratorTelemetry, n: int):
    watch = telemetry.watch(request)  # as the Generator calls it on each engine output
    async for out in outputs(n):
        if watch is not None:
            watch(out)
        yield out
    if watch is not None:
        watch.close()


async def generator_side(n: int, request: GenerationRequest, telemetry: GeneratorTelemetry):
    return [o async for o in watched(request, telemetry, n)]


async def both_sides(n: int, request: GenerationRequest, telemetry: GeneratorTelemetry):
    generate = metered(lambda r: watched(r, telemetry, n), "tandem")
    return [o async for o in generate(request)]


def per_output_us(fn, n: int, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        asyncio.run(fn())
        best = min(best, time.perf_counter() - start)
    return best / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--outputs", type=int, default=20000)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    import ray

    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    telemetry = GeneratorTelemetry(TandemConfig())
    request = GenerationRequest("r-0", [1, 2, 3], adapter="qa")
    n, k = args.outputs, args.repeats
    rows = {"bare": per_output_us(lambda: bare(n, request), n, k),
            "generator": per_output_us(lambda: generator_side(n, request, telemetry), n, k),
            "generator+ingress": per_output_us(lambda: both_sides(n, request, telemetry), n, k)}
    ray.shutdown()
    print(f"{'path':>18} {'us/output':>10} {'added':>8}")
    for name, us in rows.items():
        print(f"{name:>18} {us:>10.2f} {us - rows['bare']:>8.2f}")
    out = ROOT / "bench" / "results" / "telemetry_cost.json"
    out.write_text(json.dumps({"outputs": n, "repeats": k, "us_per_output": rows}, indent=2) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
