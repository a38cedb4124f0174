"""The adapter router on CPU: latency, batched throughput, and accuracy of its two modes.

In one run, in-process (no Ray): start-up (embed the examples, fit the head); p50/p99 latency
of routing one prompt against the bare MiniLM embedding of the same prompt (baseline, ratio);
throughput of 32 prompts routed as one batch against 32 one-by-one calls (ratio); accuracy on
tests/data/router_heldout.jsonl with the base class and with the threshold alone, and on the
toy world's task prompts when models/builtin/world.py has them. Prints a table, writes JSON.

    python bench/router.py                       # writes bench/results/router.json
    python bench/router.py --serve               # also through a Ray Serve Router (slower)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from models.embedding import shared_embedder  # noqa: E402
from models.routing.config import AdapterConfig, RouterConfig  # noqa: E402
from models.routing.router import AdapterRouter  # noqa: E402

DATA = ROOT / "tests" / "data"


def load_adapters() -> list[AdapterConfig]:
    doc = yaml.safe_load((DATA / "router_adapters.yaml").read_text())
    return [AdapterConfig.model_validate(a) for a in doc["adapters"]]


def load_heldout() -> list[dict]:
    return [json.loads(line) for line in (DATA / "router_heldout.jsonl").read_text().splitlines()]


def world_rows(per_task: int = 100) -> list[dict]:
    """The toy world's own task prompts, if its generator exists."""
    try:
        from models.builtin.world import TASKS, sample_task_prompt
    except ImportError:
        return []
    rng = random.Random(0)
    return [
        {"prompt": sample_task_prompt(t, rng)[0], "label": t}
        for t in TASKS
        for _ in range(per_task)
    ]


def timed_ms(fn, repeats: int) -> tuple[np.ndarray, np.ndarray]:
    """Wall time and process CPU time of each of `repeats` calls, in ms.

    CPU time is the figure that survives a shared, busy machine: wall time there includes
    waiting for a core.
    """
    wall, cpu = [], []
    for i in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn(i)
        wall.append((time.perf_counter() - start) * 1000)
        cpu.append((time.process_time() - start_cpu) * 1000)
    return np.array(wall), np.array(cpu)


def accuracy(router: AdapterRouter, rows: list[dict], thresholds: list[float]) -> dict:
    """Share of rows routed to their label, per threshold, from one embedding pass."""
    probabilities = router.adapter_probabilities([r["prompt"] for r in rows])
    out = {}
    for t in thresholds:
        router.config = router.config.model_copy(update={"threshold": t})
        decisions = router.decide(*probabilities)
        hits = [(d.adapter or "base") == r["label"] for d, r in zip(decisions, rows, strict=True)]
        out[t] = sum(hits) / len(rows)
    return out


def serve_numbers(prompts: list[str], rounds: int = 10) -> dict:
    """Through a real Ray Serve Router: one call at a time, and 32 concurrent calls per round."""
    import ray
    from ray import serve

    from deployments.router import Router

    doc = yaml.safe_load((DATA / "router_adapters.yaml").read_text())
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(proxy_location="Disabled")
        app = Router.options(ray_actor_options={"num_cpus": 0.5}).bind(
            doc["adapters"], doc["router"]
        )
        handle = serve.run(app, name="router_bench", route_prefix=None)
        handle.route.remote(prompts[0]).result()
        single, _ = timed_ms(lambda i: handle.route.remote(prompts[i]).result(), 50)

        def concurrent_round(i: int) -> None:
            batch = prompts[32 * i : 32 * (i + 1)]
            for response in [handle.route.remote(p) for p in batch]:
                response.result()

        rounds_ms, _ = timed_ms(concurrent_round, rounds)
        info = handle.info.remote().result()
    finally:
        serve.shutdown()
        ray.shutdown()
    return {
        "handle_single_p50_ms": float(np.percentile(single, 50)),
        "handle_single_p99_ms": float(np.percentile(single, 99)),
        "concurrent_32_round_ms_p50": float(np.median(rounds_ms)),
        "concurrent_32_prompts_per_s": 32 * 1000 / float(np.median(rounds_ms)),
        "max_batch_size_seen": info["max_batch_size_seen"],
        "batches": info["batches"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=200, help="Single-prompt calls timed.")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "router.json"))
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (a Router replica with num_cpus < 2 has 1).",
    )
    parser.add_argument(
        "--serve", action="store_true", help="Also time calls through a Ray Serve Router."
    )
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]

    adapters, heldout = load_adapters(), load_heldout()
    prompts = [r["prompt"] for r in heldout]
    embedder = shared_embedder()
    embedder.embed(prompts[:8])  # warm-up

    start = time.perf_counter()
    router = AdapterRouter(adapters, RouterConfig(), embedder=embedder)
    startup_s = time.perf_counter() - start
    router.route(prompts[:8])

    embed_ms, embed_cpu = timed_ms(
        lambda i: embedder.embed([prompts[i % len(prompts)]]), args.repeats
    )
    route_ms, route_cpu = timed_ms(
        lambda i: router.route([prompts[i % len(prompts)]]), args.repeats
    )
    batch = [prompts[(7 * i) % len(prompts)] for i in range(32)]
    batched_ms, batched_cpu = timed_ms(lambda i: router.route(batch), 10)
    one_by_one_ms, one_by_one_cpu = timed_ms(lambda i: [router.route([p]) for p in batch], 3)

    thresholds = [0.3, 0.4, 0.5, 0.6, 0.7]
    with_base = AdapterRouter(adapters, RouterConfig(base_class=True), embedder=embedder)
    threshold_only = AdapterRouter(adapters, RouterConfig(base_class=False), embedder=embedder)
    world = world_rows()
    modes = {}
    for mode, r in (("base_class", with_base), ("threshold_only", threshold_only)):
        modes[mode] = {
            "heldout": accuracy(r, heldout, thresholds),
            "world_tasks": accuracy(r, world, thresholds) if world else None,
        }

    result = {
        "startup_s": startup_s,
        "num_examples": sum(len(a.examples) for a in adapters),
        "single_prompt_ms": {
            "route_p50": float(np.percentile(route_ms, 50)),
            "route_p99": float(np.percentile(route_ms, 99)),
            "route_cpu_p50": float(np.percentile(route_cpu, 50)),
            "route_cpu_p99": float(np.percentile(route_cpu, 99)),
            "embed_only_p50": float(np.percentile(embed_ms, 50)),
            "embed_only_p99": float(np.percentile(embed_ms, 99)),
            "embed_only_cpu_p50": float(np.percentile(embed_cpu, 50)),
            "route_over_embed_p50": float(np.median(route_ms) / np.median(embed_ms)),
        },
        "batch_of_32": {
            "batched_ms_p50": float(np.median(batched_ms)),
            "batched_prompts_per_s": 32 * 1000 / float(np.median(batched_ms)),
            "batched_cpu_ms_p50": float(np.median(batched_cpu)),
            "one_by_one_ms": float(np.median(one_by_one_ms)),
            "one_by_one_cpu_ms": float(np.median(one_by_one_cpu)),
            "one_by_one_prompts_per_s": 32 * 1000 / float(np.median(one_by_one_ms)),
            "batching_speedup": float(np.median(one_by_one_ms) / np.median(batched_ms)),
        },
        "accuracy": modes,
        "heldout_size": len(heldout),
        "world_tasks_size": len(world),
        "torch_threads": torch.get_num_threads(),
        "load_average_1min": {"before": load_before, "after": os.getloadavg()[0]},
        "machine_cores": os.cpu_count(),
    }
    if args.serve:
        result["serve"] = serve_numbers(prompts)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print_table(result, thresholds)


def print_table(r: dict, thresholds: list[float]) -> None:
    s, b = r["single_prompt_ms"], r["batch_of_32"]
    rows = [
        ("start-up (embed examples + fit head)", f"{r['startup_s']:.2f} s"),
        ("one prompt: route p50 / p99", f"{s['route_p50']:.1f} / {s['route_p99']:.1f} ms"),
        (
            "one prompt: embed only p50 / p99",
            f"{s['embed_only_p50']:.1f} / {s['embed_only_p99']:.1f} ms",
        ),
        (
            "one prompt: route CPU time p50 / p99",
            f"{s['route_cpu_p50']:.1f} / {s['route_cpu_p99']:.1f} ms",
        ),
        ("one prompt: embed only CPU time p50", f"{s['embed_only_cpu_p50']:.1f} ms"),
        ("route / embed (wall p50)", f"{s['route_over_embed_p50']:.2f}x"),
        (
            "32 prompts batched",
            f"{b['batched_ms_p50']:.0f} ms = {b['batched_prompts_per_s']:.0f}/s",
        ),
        (
            "32 prompts one by one",
            f"{b['one_by_one_ms']:.0f} ms = {b['one_by_one_prompts_per_s']:.0f}/s",
        ),
        (
            "32 prompts CPU time batched / one by one",
            f"{b['batched_cpu_ms_p50']:.0f} / {b['one_by_one_cpu_ms']:.0f} ms",
        ),
        ("batching speed-up (wall)", f"{b['batching_speedup']:.2f}x"),
        (
            "load average before / after, cores",
            f"{r['load_average_1min']['before']:.1f} / {r['load_average_1min']['after']:.1f}, {r['machine_cores']}",
        ),
    ]
    if "serve" in r:
        v = r["serve"]
        rows += [
            (
                "Serve handle: one call p50 / p99",
                f"{v['handle_single_p50_ms']:.1f} / {v['handle_single_p99_ms']:.1f} ms",
            ),
            (
                "Serve handle: 32 concurrent calls",
                f"{v['concurrent_32_round_ms_p50']:.0f} ms = {v['concurrent_32_prompts_per_s']:.0f}/s",
            ),
            ("Serve batches / largest batch", f"{v['batches']} / {v['max_batch_size_seen']}"),
        ]
    for mode, acc in r["accuracy"].items():
        for name, by_t in acc.items():
            if by_t:
                cells = "  ".join(f"{t}:{by_t[t]:.3f}" for t in thresholds)
                rows.append((f"accuracy {mode}, {name} (threshold:acc)", cells))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


if __name__ == "__main__":
    main()
