"""Serve benchmark: `serve run serve_config.yaml` to first answer, then tokens/s through HTTP.

Starts the real command in a subprocess, waits for the first chat answer, measures one stream
and N concurrent streams with the official openai client, stops the app (SIGTERM), prints a
table and writes bench/results/serve_cpu.json.

    .venv/bin/python bench/serve_cpu.py [--config serve_config.yaml] [--concurrency 16]
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
from pathlib import Path

import openai

ROOT = Path(__file__).resolve().parent.parent


async def stream_tokens(client: openai.AsyncOpenAI, model: str, i: int, max_tokens: int, extra: dict):
    """One streamed chat; returns (completion tokens, time to first token, total seconds)."""
    start = time.perf_counter()
    first = None
    stream = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": f"Tell me a story about Mia, part {i}."}],
        max_tokens=max_tokens, stream=True, stream_options={"include_usage": True},
        extra_body={"ignore_eos": True, **extra}, seed=i,
    )
    tokens = 0
    async for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - start
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    return tokens, first or 0.0, time.perf_counter() - start


async def measure(base_url: str, model: str, concurrency: int, max_tokens: int, extra: dict) -> dict:
    client = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=600)
    start = time.perf_counter()
    async with client:
        results = await asyncio.gather(*(stream_tokens(client, model, i, max_tokens, extra)
                                         for i in range(concurrency)))
    wall = time.perf_counter() - start
    tokens = sum(r[0] for r in results)
    ttfts = sorted(r[1] for r in results)
    return {
        "concurrency": concurrency,
        "tokens": tokens,
        "seconds": round(wall, 3),
        "tokens_per_s": round(tokens / wall, 1),
        "ttft_p50_s": round(ttfts[len(ttfts) // 2], 3),
    }


def wait_first_answer(base_url: str, model: str, proc: subprocess.Popen, timeout: float) -> float:
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=30)
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"serve run exited with {proc.returncode}")
        try:
            client.chat.completions.create(model=model, max_tokens=1,
                                           messages=[{"role": "user", "content": "hi"}])
            return time.monotonic() - start
        except (openai.APIConnectionError, openai.InternalServerError, openai.NotFoundError,
                openai.APIStatusError):
            time.sleep(0.25)
    raise TimeoutError("no answer from the app")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", default=str(ROOT / "serve_config.yaml"))
    ap.add_argument("--model", default="tandem")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "serve_cpu.json"))
    args = ap.parse_args()

    base_url = f"http://127.0.0.1:{args.port}"
    serve_bin = str(Path(sys.executable).parent / "serve")
    t0 = time.monotonic()
    proc = subprocess.Popen([serve_bin, "run", args.config], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        first_answer_s = wait_first_answer(base_url, args.model, proc, timeout=300)
        first_answer_s = time.monotonic() - t0
        single = asyncio.run(measure(base_url, args.model, 1, args.max_tokens, {}))
        many = asyncio.run(measure(base_url, args.model, args.concurrency, args.max_tokens, {}))
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)

    result = {"serve_run_to_first_answer_s": round(first_answer_s, 2), "single": single, "concurrent": many,
              "max_tokens": args.max_tokens, "config": os.path.relpath(args.config, ROOT)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'figure':<40} {'value':>12}")
    print(f"{'serve run -> first answer (s)':<40} {first_answer_s:>12.2f}")
    print(f"{'1 stream: tokens/s':<40} {single['tokens_per_s']:>12.1f}")
    print(f"{f'{args.concurrency} streams: aggregate tokens/s':<40} {many['tokens_per_s']:>12.1f}")
    print(f"{f'{args.concurrency} streams: TTFT p50 (s)':<40} {many['ttft_p50_s']:>12.3f}")
    print(f"{'ratio concurrent / single':<40} {many['tokens_per_s'] / max(single['tokens_per_s'], 1e-9):>12.2f}")


if __name__ == "__main__":
    main()
