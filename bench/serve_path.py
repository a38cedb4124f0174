"""What a client gets next to what the engine makes: three levels, same model, same run.

1. `engine`: LLMEngine stepped in a loop in this process (the ceiling).
2. `async`:  the engine behind its async wrapper (TorchEngine), N concurrent consumers, as the
             Generator replica drives it.
3. `served`: `serve run <config>` in a subprocess, N streaming clients over HTTP with the
             official openai client; tokens counted from `usage`, not from chunks.

Same chat prompt (the chat template of the served model), greedy, `--max-tokens` new tokens
with ignore_eos, for each stream count. Prints tokens/s, TTFT p50/p99, inter-token p50/p99 and
the ratios to the engine loop; writes bench/results/serve_path_<device>.json.

On a GPU, the served level also runs with steering (`--steer policy:mode`, inter-token time
against the unsteered served run) and with several Generator replicas sharing the card
(`--replicas 1 2`: aggregate tokens/s and the spread of per-stream speed).

    .venv/bin/python bench/serve_path.py [--streams 1 16 64] [--max-tokens 64]
    python bench/gpu_checkpoint.py && python bench/serve_path.py --config serve_config.gpu.yaml \
        --streams 1 16 64 128 --max-tokens 128 --prompt-tokens 128 \
        --steer guard:async proxy:colocated --replicas 1 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
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

    speeds = sorted(s.tokens / (s.arrivals[-1] - s.arrivals[0]) for s in streams
                    if len(s.arrivals) > 1 and s.arrivals[-1] > s.arrivals[0])  # fmt: skip
    return {"tokens": tokens, "seconds": round(wall, 3), "tokens_per_s": round(tokens / wall, 1),
            "ttft_p50_ms": pct(ttfts, 0.5), "ttft_p99_ms": pct(ttfts, 0.99),
            "itl_p50_ms": pct(gaps, 0.5), "itl_p99_ms": pct(gaps, 0.99),
            "stream_tok_s_min": round(speeds[0], 1) if speeds else 0.0,
            "stream_tok_s_max": round(speeds[-1], 1) if speeds else 0.0}  # fmt: skip


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


async def served(
    base_url: str,
    model: str,
    n: int,
    max_tokens: int,
    prompt: str = PROMPT,
    steering: dict | None = None,
) -> dict:
    client = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0,
                                timeout=600)  # fmt: skip
    extra = {"ignore_eos": True} | ({"steering": steering} if steering else {})

    async def one(stream: Stream) -> None:
        chunks = await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
            temperature=0, stream=True, stream_options={"include_usage": True},
            extra_body=extra)  # fmt: skip
        async for chunk in chunks:
            # a chunk with a choice carries >= 1 token (random weights may decode to "")
            if chunk.choices and (chunk.choices[0].delta.content is not None
                                  or chunk.choices[0].finish_reason is None):  # fmt: skip
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
            client.chat.completions.create(
                model=model, max_tokens=1, messages=[{"role": "user", "content": "hi"}]
            )
            return
        except openai.APIError:
            time.sleep(0.25)
    raise TimeoutError("no answer from the app")


def prompt_text(tokenizer, tokens: int) -> str:
    """PROMPT, or a story of about `tokens` chat-template tokens."""
    if tokens <= 0:
        return PROMPT
    text, sentence = "Tell me a story.", " Mia has the red ball in the park."
    while len(chat_ids(tokenizer, text + sentence)) <= tokens:
        text += sentence
    return text


def chat_ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True,
        return_dict=False))  # fmt: skip


def in_process(args, app: dict) -> tuple[dict, dict, str]:
    config = load_config(app["args"])
    threads = int(config.deployments.generator.env.get("OMP_NUM_THREADS", torch.get_num_threads()))
    torch.set_num_threads(threads)  # what the Generator replica runs with
    engine_config = config.engine.model_copy(update={"max_num_seqs": max(args.streams)})
    paths = resolve_source(config.model.source)
    async_engine = TorchEngine(engine_config, paths.big)
    for adapter in config.adapters:  # loaded as the Generator loads them: same LoRA work
        path = resolve_adapter(adapter.path, paths)
        asyncio.run(async_engine.load_adapter(adapter.name, path))
    prompt = prompt_text(async_engine.tokenizer, args.prompt_tokens)
    prompt_ids = chat_ids(async_engine.tokenizer, prompt)
    print(f"prompt: {len(prompt_ids)} tokens", flush=True)
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
    return loop, wrapped, prompt


def replica_config(path: str, replicas: int) -> str:
    """The config with `replicas` Generator replicas sharing the Generator's GPU share."""
    doc = yaml.safe_load(Path(path).read_text())
    args = doc["applications"][0]["args"]
    gen = args.setdefault("deployments", {}).setdefault("generator", {})
    gen["num_replicas"] = replicas
    if gen.get("num_gpus"):
        gen["num_gpus"] = round(gen["num_gpus"] / replicas, 3)
        engine = args.setdefault("engine", {})
        engine["kv_cache_memory_fraction"] = round(
            engine.get("kv_cache_memory_fraction", 0.85) / replicas, 3)  # fmt: skip
    out = Path(tempfile.mkdtemp()) / f"replicas{replicas}.yaml"
    out.write_text(yaml.safe_dump(doc))
    return str(out)


def through_serve(args, model: str, prompt: str, replicas: int) -> dict:
    """Served runs for each stream count (and, with one replica, each steering setting)."""
    base_url = f"http://127.0.0.1:{args.port}"
    serve_bin = str(Path(sys.executable).parent / "serve")
    config = args.config if replicas == 1 else replica_config(args.config, replicas)
    log = open(Path(tempfile.gettempdir()) / f"serve_path_replicas{replicas}.log", "w")  # noqa: SIM115
    proc = subprocess.Popen([serve_bin, "run", config], cwd=ROOT, start_new_session=True,
                            stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    started = time.monotonic()
    results: dict = {}
    try:
        wait_ready(base_url, model, proc, timeout=args.start_timeout)
        print(f"serve run ({replicas} Generator replicas) -> first answer: "
              f"{time.monotonic() - started:.1f} s", flush=True)  # fmt: skip
        asyncio.run(served(base_url, model, max(args.streams), 8, prompt))  # warm-up
        for n in args.streams:
            results[("served", n)] = asyncio.run(
                served(base_url, model, n, args.max_tokens, prompt)
            )
        for setting in args.steer if replicas == 1 else []:
            policy, _, mode = setting.partition(":")
            steering = {"policy": policy, "mode": mode or "async"}
            asyncio.run(served(base_url, model, 2, 8, prompt, steering))  # warm-up
            for n in args.steer_streams:
                results[(f"steer {setting}", n)] = asyncio.run(
                    served(base_url, model, n, args.max_tokens, prompt, steering))  # fmt: skip
        return results
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
        wait_port_free(args.port)


def wait_port_free(port: int, timeout: float = 60) -> None:
    """Until nothing listens on `port` (the next `serve run` must not find the last app)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) != 0:
                return
        time.sleep(0.5)
    raise TimeoutError(f"port {port} still in use {timeout:.0f} s after serve run stopped")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "serve_config.yaml"))
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--skip-serve", action="store_true", help="levels 1 and 2 only")
    ap.add_argument(
        "--prompt-tokens",
        type=int,
        default=0,
        help="a prompt of about this many tokens (0: a one-line request)",
    )
    ap.add_argument(
        "--steer",
        nargs="*",
        default=[],
        metavar="POLICY:MODE",
        help="served runs with steering, e.g. guard:async proxy:colocated",
    )
    ap.add_argument("--steer-streams", type=int, nargs="+", default=[1, 16])
    ap.add_argument(
        "--replicas",
        type=int,
        nargs="+",
        default=[1],
        help="Generator replica counts to serve with (sharing its GPU share)",
    )
    ap.add_argument("--start-timeout", type=float, default=300)
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/...)")
    args = ap.parse_args()
    doc = yaml.safe_load(Path(args.config).read_text())
    app = doc["applications"][0]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    card = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    loop, wrapped, prompt = in_process(args, app)
    serve: dict = {}
    for replicas in [] if args.skip_serve else args.replicas:
        for (level, n), result in through_serve(args, app["args"]["model"]["name"], prompt,
                                                replicas).items():  # fmt: skip
            serve[(level if replicas == 1 else f"served x{replicas}", n)] = result
    rows = []
    print(f"\n{card}: {args.max_tokens} new tokens, prompt as above")
    print(f"{'streams':>7} {'level':>22} {'tok/s':>9} {'x loop':>7} {'TTFT p50':>9} {'p99':>8} "
          f"{'ITL p50':>8} {'p99':>8} {'x served ITL':>12}  (ms)")  # fmt: skip
    levels = sorted({level for level, _ in serve}, key=lambda x: (x != "served", x))
    for n in sorted({*args.streams, *args.steer_streams}):
        plain = serve.get(("served", n))
        for level, result in (("engine", loop.get(n)), ("async", wrapped.get(n)),
                              *((lv, serve.get((lv, n))) for lv in levels)):  # fmt: skip
            if result is None:
                continue
            ratio = result["tokens_per_s"] / loop[n]["tokens_per_s"] if n in loop else 0.0
            itl = (result["itl_p50_ms"] / plain["itl_p50_ms"]
                   if plain and plain["itl_p50_ms"] and level.startswith("steer") else None)  # fmt: skip
            rows.append({"streams": n, "level": level, "x_loop": round(ratio, 3), **result,
                         **({"x_served_itl": round(itl, 3)} if itl else {})})  # fmt: skip
            print(f"{n:>7} {level:>22} {result['tokens_per_s']:>9.1f} {ratio:>7.2f} "
                  f"{result['ttft_p50_ms']:>9.1f} {result['ttft_p99_ms']:>8.1f} "
                  f"{result['itl_p50_ms']:>8.2f} {result['itl_p99_ms']:>8.2f} "
                  f"{(f'{itl:.2f}' if itl else ''):>12}")  # fmt: skip
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"serve_path_{device}.json"
    out.write_text(json.dumps({"device": card, "config": os.path.relpath(args.config, ROOT),
                               "max_tokens": args.max_tokens, "prompt_tokens": args.prompt_tokens,
                               "rows": rows}, indent=2) + "\n")  # fmt: skip
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
