"""Sustained load: N streaming clients for a while; errors, TTFT/TPOT, and memory growth.

    python bench/load.py                       # starts the default app (serve_config.yaml)
    python bench/load.py --url http://127.0.0.1:8000 --clients 64 --duration 120

Each client loops: one streamed chat request (a mix of plain, `auto`, an adapter and a steering
vector, like real traffic), measured from the request to its first token (TTFT) and per token
after it (TPOT, from `usage.completion_tokens`). The baseline, in the same run, is one client
alone for `--baseline` seconds. Errors: any non-200, an error event, a stream without
`[DONE]`, or a failed connection. Memory: the RSS of each Ray process (the app's when this
script starts it: its own process tree; with --url, every process named `ray::…` on this
machine) after a warm-up at full load (`--warmup`), every eighth of the run, and at the end;
growth over 5 % from the start to the end is flagged.

Writes bench/results/load_<device>.json and prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import psutil
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROMPTS = [
    ("tandem", "Tell me about Mia and the red ball.", None),
    ("tandem", "Tom is in the garden. Where is Tom?", None),
    ("tandem:auto", "Rewrite in a positive tone: the old dog is sad near the lake.", None),
    ("tandem:qa", "Mia has the red ball. Question: who has the red ball?", None),
    ("tandem", "The park is", {"vectors": [{"name": "positive", "coeff": 4.0}]}),
]
RSS_GROWTH_LIMIT = 0.05


def start_app(config: Path) -> str:
    """Ray + Serve on a free port with the config's first application; returns its URL."""
    import socket

    import ray
    from ray import serve

    from deployments.app import build_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = yaml.safe_load(config.read_text())["applications"][0]["args"]
    serve.run(build_app(args), name="tandem", route_prefix="/")
    return f"http://127.0.0.1:{port}"


def ray_processes(own: bool) -> dict[int, tuple[str, int]]:
    """pid -> (name, RSS bytes) of the Ray processes: this process's tree, or every `ray::`."""
    procs = psutil.Process().children(recursive=True) if own else psutil.process_iter()
    out = {}
    for p in procs:
        try:
            cmd = " ".join(p.cmdline())
            # a replica's title names the task it runs too (ray::…:Generator.method)
            name = cmd.split()[0].split(".")[0] if cmd.startswith("ray::") else p.name()
            if own or cmd.startswith("ray::"):
                out[p.pid] = (name[:60], p.memory_info().rss)
        except (psutil.NoSuchProcess, psutil.AccessDenied, IndexError):
            continue
    return out


class Client:
    def __init__(self, url: str, key: str | None, max_tokens: int):
        self.url, self.max_tokens = url, max_tokens
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.ttft: list[float] = []
        self.tpot: list[float] = []
        self.errors: list[str] = []
        self.requests = 0

    async def one(self, http: httpx.AsyncClient, rng: random.Random) -> None:
        model, prompt, steering = rng.choice(PROMPTS)
        body = {"model": model, "messages": [{"role": "user", "content": prompt}],
                "max_tokens": self.max_tokens, "stream": True, "ignore_eos": True,
                "stream_options": {"include_usage": True}}
        if steering:
            body["steering"] = steering
        started, first, last, tokens, done = time.perf_counter(), None, None, 0, False
        self.requests += 1
        try:
            async with http.stream("POST", f"{self.url}/v1/chat/completions", json=body,
                                   headers=self.headers) as r:
                if r.status_code != 200:
                    self.errors.append(f"{r.status_code}: {(await r.aread())[:200]!r}")
                    return
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    if line == "data: [DONE]":
                        done = True
                        break
                    event = json.loads(line[6:])
                    if "error" in event:
                        self.errors.append(f"error event: {event['error']}")
                        return
                    if event.get("usage"):
                        tokens = event["usage"]["completion_tokens"]
                    if any(c.get("delta", {}).get("content") for c in event["choices"]):
                        last = time.perf_counter()
                        first = first or last
        except (httpx.HTTPError, json.JSONDecodeError) as exc:
            self.errors.append(f"{type(exc).__name__}: {exc}")
            return
        if not done:
            self.errors.append("stream ended without [DONE]")
        elif first is not None:
            self.ttft.append(first - started)
            if tokens > 1:
                self.tpot.append((last - first) / (tokens - 1))

    async def run(self, until: float, seed: int) -> None:
        rng = random.Random(seed)
        async with httpx.AsyncClient(timeout=120) as http:
            while time.perf_counter() < until:
                await self.one(http, rng)


async def phase(url: str, key: str | None, clients: int, seconds: float, max_tokens: int) -> dict:
    crowd = [Client(url, key, max_tokens) for _ in range(clients)]
    started = time.perf_counter()
    await asyncio.gather(*(c.run(started + seconds, i) for i, c in enumerate(crowd)))
    took = time.perf_counter() - started
    ttft = np.array([t for c in crowd for t in c.ttft]) * 1e3
    tpot = np.array([t for c in crowd for t in c.tpot]) * 1e3
    errors = [e for c in crowd for e in c.errors]

    def pct(a: np.ndarray, q: float) -> float | None:
        return round(float(np.percentile(a, q)), 2) if len(a) else None

    return {"clients": clients, "seconds": round(took, 1),
            "requests": sum(c.requests for c in crowd), "completed": len(ttft),
            "errors": len(errors), "error_samples": errors[:5],
            "requests_per_s": round(len(ttft) / took, 2),
            "ttft_ms": {"p50": pct(ttft, 50), "p99": pct(ttft, 99)},
            "tpot_ms": {"p50": pct(tpot, 50), "p99": pct(tpot, 99)}}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", help="a running app; default: start serve_config.yaml's app")
    ap.add_argument("--config", type=Path, default=ROOT / "serve_config.yaml")
    ap.add_argument("--api-key", default=os.environ.get("TANDEM_API_KEY"))
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--duration", type=float, default=120.0)
    ap.add_argument("--baseline", type=float, default=15.0, help="seconds of one client alone")
    ap.add_argument("--warmup", type=float, default=15.0, help="seconds at full load, unmeasured")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()

    import torch

    device = "gpu" if torch.cuda.is_available() else "cpu"
    url = a.url or start_app(a.config)
    own = a.url is None
    print(f"app at {url}; baseline, then warming up at {a.clients} clients")
    baseline = asyncio.run(phase(url, a.api_key, 1, a.baseline, a.max_tokens))
    # at full concurrency first: buffers and pools sized for N clients are not growth
    asyncio.run(phase(url, a.api_key, a.clients, a.warmup, a.max_tokens))
    samples: list[dict[int, tuple[str, int]]] = [ray_processes(own)]

    async def load() -> dict:
        async def sample() -> None:
            while True:
                await asyncio.sleep(a.duration / 8)
                samples.append(ray_processes(own))

        sampler = asyncio.create_task(sample())
        try:
            return await phase(url, a.api_key, a.clients, a.duration, a.max_tokens)
        finally:
            sampler.cancel()

    loaded = asyncio.run(load())
    samples.append(ray_processes(own))
    before, after = samples[0], samples[-1]
    mib = 2**-20
    rss = [{"pid": pid, "process": name, "start_mib": round(rss * mib, 1),
            "end_mib": round(after[pid][1] * mib, 1),
            "growth": round(after[pid][1] / rss - 1, 4),
            "samples_mib": [round(s[pid][1] * mib, 1) for s in samples if pid in s]}
           for pid, (name, rss) in sorted(before.items()) if pid in after and rss > 0]  # fmt: skip
    grew = [r for r in rss if r["growth"] > RSS_GROWTH_LIMIT]
    result = {"device": device, "url": None if own else url, "max_tokens": a.max_tokens,
              "baseline_one_client": baseline, "load": loaded, "rss": rss,
              "rss_growth_limit": RSS_GROWTH_LIMIT, "rss_over_limit": grew,
              "ok": loaded["errors"] == 0 and not grew}  # fmt: skip

    print(f"\n{'phase':<10} {'clients':>7} {'done':>6} {'err':>4} {'req/s':>6} "
          f"{'TTFT p50':>9} {'p99':>7} {'TPOT p50':>9} {'p99':>7}  (ms)")
    for label, p in (("baseline", baseline), ("load", loaded)):
        print(f"{label:<10} {p['clients']:>7} {p['completed']:>6} {p['errors']:>4} "
              f"{p['requests_per_s']:>6} {p['ttft_ms']['p50']!s:>9} {p['ttft_ms']['p99']!s:>7} "
              f"{p['tpot_ms']['p50']!s:>9} {p['tpot_ms']['p99']!s:>7}")
    print(f"\n{'process':<45} {'start MiB':>10} {'end MiB':>9} {'growth':>8}")
    for r in sorted(rss, key=lambda r: -r["start_mib"]):
        flag = "  > 5 %" if r in grew else ""
        print(f"{r['process']:<45} {r['start_mib']:>10} {r['end_mib']:>9} "
              f"{r['growth'] * 100:>7.1f}%{flag}")
    out = a.out or ROOT / "bench" / "results" / f"load_{device}.json"
    out.write_text(json.dumps(result, indent=1))
    print(f"\n{'OK' if result['ok'] else 'NOT OK'}: {loaded['errors']} errors, "
          f"{len(grew)} processes grew over 5 %; wrote {out}")


if __name__ == "__main__":
    main()
