"""The vLLM engine vs the torch engine behind the same Engine contract, built-in toy model, CPU.

Both are driven the way the Generator drives them (`engine.generate` streams on one event
loop): N concurrent greedy requests of --max-tokens tokens each, generated tokens per second
(prefill included), best of --repeats runs alternating the two sides (the shared CPU is noisy);
plus proxy tuning (the small model in the loop: the torch engine's step observer, vLLM's logits
processor) at one stream, and a steering vector on 3 layers at 16 streams (the torch engine's
per-row steering, vLLM's forward hooks; the plain rows run with the hooks installed too).
Prints a table, writes bench/results/engines_cpu.json.

Run it in the venv that has vLLM (`make setup-vllm`):

    .venv-vllm/bin/python bench/engines.py [--streams 1 16 64] [--max-tokens 64] [--repeats 3]

vLLM's CPU build binds its engine process's OpenMP threads itself (VLLM_CPU_OMP_THREADS_BIND,
default: all cores but one, reserved for the front end); the torch engine runs in this process
with torch's default threads.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import time
from pathlib import Path

from models.builtin import resolve_source
from models.engine import build_engine
from models.engine.config import EngineConfig
from models.engine.torch_engine import TorchEngine
from models.protocol.engine import Engine
from models.protocol.requests import GenerationRequest, SamplingParams, SteerVectorSpec
from models.protocol.steering import SteeringRequest
from models.steering.config import SteeringConfig, SteeringSetup
from models.steering.runtime import SteeringRuntime

RESULTS = Path(__file__).parent / "results" / "engines_cpu.json"
STEERING = {"expert_adapter": "positive",
            "policies": [{"name": "proxy", "kind": "proxy_tuning", "params": {"alpha": 1.0}}]}
TEXTS = ["Anna has a red ball.", "The blue map is", "Who has the green drum?", "Omar feels"]


async def tokens_per_s(engine: Engine, prompts: list[list[int]], max_tokens: int,
                       steering: SteeringRequest | list | None = None) -> float:  # fmt: skip
    """steering: a policy request, or a list of SteerVectorSpecs."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    vectors = steering if isinstance(steering, list) else []
    policy = steering if isinstance(steering, SteeringRequest) else None

    async def one(i: int, prompt: list[int]) -> int:
        request = GenerationRequest(f"b{time.perf_counter_ns()}-{i}", prompt, params,
                                    steering=policy, steer_vectors=vectors)  # fmt: skip
        return sum([len(out.token_ids) async for out in engine.generate(request)])

    start = time.perf_counter()
    counts = await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
    return sum(counts) / (time.perf_counter() - start)


async def main(args: argparse.Namespace) -> dict:
    paths = resolve_source("builtin:toy")
    setup = SteeringSetup(steering=SteeringConfig.model_validate(STEERING),
                          model_source="builtin:toy")  # fmt: skip
    torch_engine = TorchEngine(EngineConfig(), paths.big)
    torch_engine.set_step_observer(SteeringRuntime.from_setup(setup))
    started = time.perf_counter()
    vllm_engine = build_engine(EngineConfig(kind="vllm"), paths.big, setup)
    vllm_start_s = time.perf_counter() - started
    import torch

    shape = (torch_engine.core.args.num_layers, torch_engine.core.args.hidden_size)
    vector = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    for engine in (torch_engine, vllm_engine):
        await engine.start()  # vLLM: the steering hooks in its worker
        engine.register_vector("v", vector)
    tok = torch_engine.tokenizer
    base = [tok.encode(t, add_special_tokens=False) for t in TEXTS]
    cases = [(f"{n} streams", n, None) for n in args.streams]
    cases.append(("proxy tuning, 1 stream", 1, SteeringRequest("proxy", mode="sync")))
    cases.append(("vector, 16 streams", 16, [SteerVectorSpec("v", 1.0, [1, 3, 5])]))
    rows = []
    for name, n, steering in cases:
        prompts = [base[i % len(base)] for i in range(n)]
        best = {"torch": 0.0, "vllm": 0.0}
        for engine in (torch_engine, vllm_engine):  # warm-up
            await tokens_per_s(engine, prompts[:1], 4, steering)
        for _ in range(args.repeats):
            for side, engine in (("torch", torch_engine), ("vllm", vllm_engine)):
                rate = await tokens_per_s(engine, prompts, args.max_tokens, steering)
                best[side] = max(best[side], rate)
        rows.append({"case": name, "streams": n, "torch_tok_s": round(best["torch"], 1),
                     "vllm_tok_s": round(best["vllm"], 1),
                     "vllm_over_torch": round(best["vllm"] / best["torch"], 2)})  # fmt: skip
    vllm_engine.shutdown()
    torch_engine.shutdown()
    import vllm

    return {"machine": f"{platform.node()} ({os.cpu_count()} cores, CPU)",
            "vllm": vllm.__version__, "max_tokens": args.max_tokens, "repeats": args.repeats,
            "vllm_start_s": round(vllm_start_s, 1), "rows": rows}  # fmt: skip


if __name__ == "__main__":  # vLLM's engine process starts with spawn: it re-imports this file
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    result = asyncio.run(main(parser.parse_args()))
    print(f"{'case':<24}{'torch tok/s':>13}{'vllm tok/s':>13}{'vllm/torch':>12}")
    for row in result["rows"]:
        print(f"{row['case']:<24}{row['torch_tok_s']:>13}{row['vllm_tok_s']:>13}"
              f"{row['vllm_over_torch']:>12}")  # fmt: skip
    print(f"vLLM start: {result['vllm_start_s']} s ({result['vllm']})")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS}")
