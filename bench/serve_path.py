"""What a client gets next to what the engine makes: three levels, same model, same run.

1. `engine`: LLMEngine stepped in a loop in this process (the ceiling).
2. `async`:  the engine behind its async wrapper (TorchEngine), N concurrent consumers, as the
             Generator replica drives it.
3. `served`: `serve run <config>` in a subprocess, N streaming clients over HTTP with the
             official openai client; tokens counted from `usage`, not from chunks.

Same chat prompt (the chat template of the served model), greedy, `--max-tokens` new tokens
with ignore_eos, for each stream count. Prints tokens/s, TTFT p50/p99, inter-token p50/p99 and
the ratios to the engine loop; writes bench/results/serve_path_<device>.json.

    .venv/bin/python bench/serve_path.py [--streams 1 16 64] [--max-tokens 64]

`--compare-metrics`: only the served level, twice in one run, with Tandem's metrics off
(TANDEM_METRICS=0) and on (the default), `--rounds` app starts each, alternated, best of
`--repeats` runs per stream count; prints
the on/off throughput ratio and writes bench/results/serve_path_metrics_<device>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import openai
import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from models.builtin import resolve_adapter, resolve_source  # noqa: E402
from models.config import load_config  # noqa: E402
from models.engine.llm_engine import LLMEngine  # noqa: E402
from models.engine.torch_engine import TorchEngine  # noqa: E402
from models.protocol.requests import GenerationRequest, SamplingParams  # noqa: E402

PROMPT = "Tell me a story about Mia."


@dataclass
class Stream:
    """Arrival times of one stream's tokens, relative to its start."""

    start: float
    arrivals: list[float] = field(default_factory=list)
    tokens: int = 0

    def mark(self, now: float, tokens: int) -> None:
        self.arrivals.append(now - self.start)
        self.tokens += tokens


def summary(streams: list[Stream], wall: float) -> dict:
    ttfts = sorted(s.arrivals[0] for s in streams if s.arrivals)
    gaps = sorted(b - a for s in streams for a, b in zip(s.arrivals, s.arrivals[1:], strict=False))
    tokens = sum(s.tokens for s in streams)

    def pct(xs: list[float], q: float) -> float:
        return round(1000 * xs[min(len(xs) - 1, int(q * len(xs)))], 2) if xs else 0.0

    return {"tokens": tokens, "seconds": round(wall, 3), "tokens_per_s": round(tokens / wall, 1),
            "ttft_p50_ms": pct(ttfts, 0.5), "ttft_p99_ms": pct(ttfts, 0.99),
            "itl_p50_ms": pct(gaps, 0.5), "itl_p99_ms": pct(gaps, 0.99)}  # fmt: skip


def requests(prompt_ids: list[int], n: int, max_tokens: int, tag: str) -> list[GenerationRequest]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    return [GenerationRequest(f"{tag}-{i}", list(prompt_ids), params) for i in range(n)]


def engine_loop(engine: LLMEngine, prompt_ids: list[int], n: int, max_tokens: int) -> dict:
    start = time.perf_counter()
    streams = {}
    for r in requests(prompt_ids, n, max_tokens, f"loop{time.perf_counter_ns()}"):
        engine.add_request(r)
        streams[r.request_id] = Stream(start)
    while engine.has_unfinished():
        outs = engine.step()
        now = time.perf_counter()
        for o in outs:
            if o.token_ids:
                streams[o.request_id].mark(now, len(o.token_ids))
    return summary(list(streams.values()), time.perf_counter() - start)


async def async_wrapper(engine: TorchEngine, prompt_ids: list[int], n: int, max_tokens: int):
    async def consume(request: GenerationRequest, stream: Stream) -> None:
        async for out in engine.generate(request):
            if out.token_ids:
                stream.mark(time.perf_counter(), len(out.token_ids))

    start = time.perf_counter()
    reqs = requests(prompt_ids, n, max_tokens, f"async{time.perf_counter_ns()}")
    streams = [Stream(start) for _ in reqs]
    await asyncio.gather(*(consume(r, s) for r, s in zip(reqs, streams, strict=True)))
    return summary(streams, time.perf_counter() - start)


async def served(base_url: str, model: str, n: int, max_tokens: int) -> dict:
    client = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0,
                                timeout=600)  # fmt: skip

    async def one(stream: Stream) -> None:
        chunks = await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": PROMPT}], max_tokens=max_tokens,
            temperature=0, stream=True, stream_options={"include_usage": True},
            extra_body={"ignore_eos": True})  # fmt: skip
        async for chunk in chunks:
            if chunk.choices and chunk.choices[0].delta.content:
                stream.mark(time.perf_counter(), 0)
            if chunk.usage:
                stream.tokens = chunk.usage.completion_tokens

    start = time.perf_counter()
    streams = [Stream(start) for _ in range(n)]
    async with client:
        await asyncio.gather(*(one(s) for s in streams))
    return summary(streams, time.perf_counter() - start)


def wait_ready(base_url: str, model: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=30)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"serve run exited with {proc.returncode}")
        try:
            client.chat.completions.create(model=model, max_tokens=1,
                                           messages=[{"role": "user", "content": "hi"}])
            return
        except openai.APIError:
            time.sleep(0.25)
    raise TimeoutError("no answer from the app")


def in_process(args, app: dict) -> tuple[dict, dict]:
    config = load_config(app["args"])
    threads = int(config.deployments.generator.env.get("OMP_NUM_THREADS", torch.get_num_threads()))
    torch.set_num_threads(threads)  # what the Generator replica runs with
    engine_config = config.engine.model_copy(update={"max_num_seqs": max(args.streams)})
    paths = resolve_source(config.model.source)
    async_engine = TorchEngine(engine_config, paths.big)
    for adapter in config.adapters:  # loaded as the Generator loads them: same LoRA work
        path = resolve_adapter(adapter.path, paths)
        asyncio.run(async_engine.load_adapter(adapter.name, path))
    tokenizer = async_engine.tokenizer
    prompt_ids = list(tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}], add_generation_prompt=True, tokenize=True,
        return_dict=False))  # fmt: skip
    loop, wrapped = {}, {}

    def best_loop(n: int) -> dict:  # the loop's best of two runs: the ceiling
        engine_loop(async_engine.core, prompt_ids, n, 4)  # warm-up
        runs = [engine_loop(async_engine.core, prompt_ids, n, args.max_tokens) for _ in range(2)]
        return max(runs, key=lambda r: r["tokens_per_s"])

    for n in args.streams:  # on the engine's own thread, where the model was built
        loop[n] = asyncio.run(async_engine.run_in_engine_thread(lambda n=n: best_loop(n)))
    for n in args.streams:
        wrapped[n] = asyncio.run(async_wrapper(async_engine, prompt_ids, n, args.max_tokens))
    async_engine.shutdown()
    return loop, wrapped


def through_serve(args, model: str, env: dict | None = None, repeats: int = 1) -> dict:
    base_url = f"http://127.0.0.1:{args.port}"
    serve_bin = str(Path(sys.executable).parent / "serve")
    doc = yaml.safe_load(Path(args.config).read_text())
    doc.setdefault("http_options", {})["port"] = args.port  # the config, served on --port
    config = Path(f"/tmp/serve_path_{args.port}.yaml")
    config.write_text(yaml.safe_dump(doc))
    proc = subprocess.Popen([serve_bin, "run", str(config)], cwd=ROOT, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, **(env or {})})  # fmt: skip
    started = time.monotonic()
    try:
        wait_ready(base_url, model, proc)
        print(f"serve run -> first answer: {time.monotonic() - started:.1f} s")
        asyncio.run(served(base_url, model, max(args.streams), 8))  # warm-up
        best = {}
        for n in args.streams:
            runs = [asyncio.run(served(base_url, model, n, args.max_tokens)) for _ in range(repeats)]
            best[n] = max(runs, key=lambda r: r["tokens_per_s"])
        return best
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        port_closed(args.port)  # Ray's processes outlive `serve run` by a few seconds


def port_closed(port: int, timeout: float = 120) -> None:
    """Wait until nothing answers on the port (the next app start must not reach this one)."""
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) != 0:
                return
        time.sleep(0.5)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "serve_config.yaml"))
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--skip-serve", action="store_true", help="levels 1 and 2 only")
    ap.add_argument("--compare-metrics", action="store_true",
                    help="served level only: metrics off vs on, same run")
    ap.add_argument("--repeats", type=int, default=3, help="runs per stream count (compare)")
    ap.add_argument("--rounds", type=int, default=2, help="off/on app starts (compare)")
    args = ap.parse_args()
    doc = yaml.safe_load(Path(args.config).read_text())
    app = doc["applications"][0]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.compare_metrics:
        return compare_metrics(args, app["args"]["model"]["name"], device)
    loop, wrapped = in_process(args, app)
    serve = {} if args.skip_serve else through_serve(args, app["args"]["model"]["name"])
    rows = []
    print(f"{'streams':>7} {'level':>7} {'tok/s':>9} {'x loop':>7} {'TTFT p50':>9} {'p99':>8} "
          f"{'ITL p50':>8} {'p99':>8}  (ms)")  # fmt: skip
    for n in args.streams:
        for level, result in (("engine", loop[n]), ("async", wrapped[n]), ("served", serve.get(n))):
            if result is None:
                continue
            ratio = result["tokens_per_s"] / loop[n]["tokens_per_s"]
            rows.append({"streams": n, "level": level, "x_loop": round(ratio, 3), **result})
            print(f"{n:>7} {level:>7} {result['tokens_per_s']:>9.1f} {ratio:>7.2f} "
                  f"{result['ttft_p50_ms']:>9.1f} {result['ttft_p99_ms']:>8.1f} "
                  f"{result['itl_p50_ms']:>8.2f} {result['itl_p99_ms']:>8.2f}")  # fmt: skip
    out = ROOT / "bench" / "results" / f"serve_path_{device}.json"
    out.write_text(json.dumps({"device": device, "config": os.path.relpath(args.config, ROOT),
                               "max_tokens": args.max_tokens, "prompt": PROMPT, "rows": rows},
                              indent=2) + "\n")  # fmt: skip
    print(f"wrote {out.relative_to(ROOT)}")


def compare_metrics(args, model: str, device: str) -> None:
    """The served level with metrics off, then on: throughput ratio and latencies per count."""
    results: dict[str, dict] = {"off": {}, "on": {}}
    for mode in ("off", "on") * args.rounds:  # alternated: drift of a shared machine evens out
        got = through_serve(args, model, {"TANDEM_METRICS": "1" if mode == "on" else "0"},
                            args.repeats)  # fmt: skip
        for n, r in got.items():
            if n not in results[mode] or r["tokens_per_s"] > results[mode][n]["tokens_per_s"]:
                results[mode][n] = r
    rows = []
    print(f"{'streams':>7} {'metrics':>7} {'tok/s':>9} {'on/off':>7} {'TTFT p50':>9} {'p99':>8} "
          f"{'ITL p50':>8} {'p99':>8}  (ms)")  # fmt: skip
    for n in args.streams:
        off = results["off"][n]["tokens_per_s"]
        for mode in ("off", "on"):
            r = results[mode][n]
            ratio = r["tokens_per_s"] / off
            rows.append({"streams": n, "metrics": mode, "on_over_off": round(ratio, 4), **r})
            print(f"{n:>7} {mode:>7} {r['tokens_per_s']:>9.1f} {ratio:>7.3f} "
                  f"{r['ttft_p50_ms']:>9.1f} {r['ttft_p99_ms']:>8.1f} "
                  f"{r['itl_p50_ms']:>8.2f} {r['itl_p99_ms']:>8.2f}")  # fmt: skip
    out = ROOT / "bench" / "results" / f"serve_path_metrics_{device}.json"
    out.write_text(json.dumps({"device": device, "config": os.path.relpath(args.config, ROOT),
                               "max_tokens": args.max_tokens, "repeats": args.repeats,
                               "rounds": args.rounds, "rows": rows}, indent=2) + "\n")  # fmt: skip
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
