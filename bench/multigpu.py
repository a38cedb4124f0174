"""Generator replicas across GPUs (or CPUs), measured through the real HTTP route.

For each replica count it deploys the Tandem app from a serve config (Generator with
`num_replicas: R` and `num_gpus` each), drives it with many concurrent streaming clients (the
official openai client), and reports aggregate tokens/s, TTFT and TPOT percentiles, unsteered
and steered (`async` policy), and how requests spread over the Generator replicas. The scaling
figure is tokens/s with the most replicas over tokens/s with one, in the same run.

    # two GPUs, one Generator replica each (the target: >= 1.8x)
    python bench/multigpu.py --replicas 1 2 --gpus-per-replica 1 --source /models/Qwen3-1.7B \
        --small-source /models/Qwen3-0.6B --concurrency 64 --max-tokens 128
    # this CPU machine: the same script, two CPU replicas
    python bench/multigpu.py --replicas 1 2 --concurrency 8 --max-tokens 24

Runs on a local Ray (started here) or an existing cluster (`--address auto`). Prints a table and
writes bench/results/multigpu.json (or --out).
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import socket
import statistics
import sys
import time
from pathlib import Path

import openai
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def one_stream(client, model: str, i: int, max_tokens: int, steering: dict | None) -> dict:
    extra = {"ignore_eos": True}
    if steering:
        extra["steering"] = steering
    start = time.perf_counter()
    stamps = []
    stream = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": f"Tell me about Mia and the kite, part {i}."}],
        max_tokens=max_tokens, stream=True, stream_options={"include_usage": True}, extra_body=extra,
        seed=i,
    )
    tokens = 0
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            stamps.append(time.perf_counter())
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    end = time.perf_counter()
    ttft = (stamps[0] - start) if stamps else end - start
    tpot = (end - stamps[0]) / max(tokens - 1, 1) if stamps else 0.0
    return {"tokens": tokens, "ttft": ttft, "tpot": tpot}


async def load(base_url: str, model: str, concurrency: int, max_tokens: int, steering: dict | None) -> dict:
    client = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=900)
    start = time.perf_counter()
    async with client:
        rows = await asyncio.gather(*(one_stream(client, model, i, max_tokens, steering)
                                      for i in range(concurrency)))
    wall = time.perf_counter() - start
    tokens = sum(r["tokens"] for r in rows)
    ttft = [r["ttft"] for r in rows]
    tpot = [r["tpot"] for r in rows]
    return {
        "tokens": tokens, "seconds": round(wall, 3), "tokens_per_s": round(tokens / wall, 1),
        "ttft_p50_ms": round(1000 * percentile(ttft, 0.5), 1),
        "ttft_p99_ms": round(1000 * percentile(ttft, 0.99), 1),
        "tpot_p50_ms": round(1000 * percentile(tpot, 0.5), 2),
        "tpot_p99_ms": round(1000 * percentile(tpot, 0.99), 2),
        "tpot_mean_ms": round(1000 * statistics.fmean(tpot), 2),
    }


def app_args(config: str, replicas: int, gpus: float, source: str | None, small: str | None) -> dict:
    with open(config) as f:
        args = copy.deepcopy(yaml.safe_load(f)["applications"][0]["args"])
    gen = args.setdefault("deployments", {}).setdefault("generator", {})
    gen["num_replicas"] = replicas
    gen["num_gpus"] = gpus
    if gpus:
        args.setdefault("engine", {})["device"] = "cuda"
        args["deployments"].setdefault("steerer", {})["num_gpus"] = min(0.2, gpus)
        args.setdefault("steering", {})["device"] = "cuda"
    if source:
        args.setdefault("model", {})["source"] = source
        args.pop("adapters", None)  # the built-in adapters belong to the built-in models
    if small:
        args.setdefault("steering", {})["small_model_source"] = small
    return args


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_one(args: argparse.Namespace, replicas: int, port: int) -> dict:
    from ray import serve

    from deployments.app import build_app

    serve.run(build_app(app_args(args.config, replicas, args.gpus_per_replica, args.source,
                                 args.small_source)), name="tandem", route_prefix="/")
    base_url = f"http://127.0.0.1:{port}"
    gen = serve.get_deployment_handle("Generator", app_name="tandem")
    asyncio.run(load(base_url, args.model, min(4, args.concurrency), 4, None))  # warm every replica
    before = {s["replica"]: s["requests_served"] for s in gen.broadcast("stats").results()}
    out = {"replicas": replicas}
    out["unsteered"] = asyncio.run(load(base_url, args.model, args.concurrency, args.max_tokens, None))
    steering = {"policy": args.policy, "mode": "async"} if args.policy else None
    if steering:
        out["steered_async"] = asyncio.run(load(base_url, args.model, args.concurrency,
                                                args.max_tokens, steering))
    after = gen.broadcast("stats").results()
    out["requests_per_replica"] = sorted(s["requests_served"] - before.get(s["replica"], 0) for s in after)
    serve.delete("tandem")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "serve_config.yaml"))
    ap.add_argument("--replicas", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--gpus-per-replica", type=float, default=0.0)
    ap.add_argument("--source", default=None, help="big model source (default: the config's)")
    ap.add_argument("--small-source", default=None, help="steering model source")
    ap.add_argument("--policy", default="proxy", help="policy for the steered run ('' to skip)")
    ap.add_argument("--model", default="tandem")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--address", default=None, help="Ray address (default: start a local Ray)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "multigpu.json"))
    args = ap.parse_args()

    import ray
    from ray import serve

    ray.init(address=args.address or "local", include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    results = []
    try:
        for r in args.replicas:
            results.append(run_one(args, r, port))
    finally:
        serve.shutdown()
        ray.shutdown()

    base = results[0]["unsteered"]["tokens_per_s"]
    for r in results:
        r["scaling_vs_first"] = round(r["unsteered"]["tokens_per_s"] / base, 2) if base else None
    report = {"gpus_per_replica": args.gpus_per_replica, "concurrency": args.concurrency,
              "max_tokens": args.max_tokens, "source": args.source or "config", "runs": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    head = f"{'replicas':>8} {'run':<14} {'tok/s':>9} {'TTFT p50':>9} {'TTFT p99':>9} {'TPOT p50':>9} {'TPOT p99':>9} {'scaling':>8}  spread"
    print(head)
    for r in results:
        for kind in ("unsteered", "steered_async"):
            if kind not in r:
                continue
            m = r[kind]
            scale = f"{r['scaling_vs_first']:.2f}x" if kind == "unsteered" else ""
            print(f"{r['replicas']:>8} {kind:<14} {m['tokens_per_s']:>9.1f} {m['ttft_p50_ms']:>8.0f}ms "
                  f"{m['ttft_p99_ms']:>8.0f}ms {m['tpot_p50_ms']:>8.1f}ms {m['tpot_p99_ms']:>8.1f}ms "
                  f"{scale:>8}  {r['requests_per_replica']}")


if __name__ == "__main__":
    main()
