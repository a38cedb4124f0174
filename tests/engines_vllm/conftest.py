"""Shared by the vLLM engine's tests: ONE in-process vLLM engine on the built-in toy model for
the whole session (about 40 s to start on 2 cores), driven on one event loop, the torch engine
to compare it with, and helpers that run requests through either."""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("vllm.engine")  # a real vLLM (not a folder named vllm)

from models.builtin import resolve_source  # noqa: E402
from models.engine import build_engine  # noqa: E402
from models.engine.config import EngineConfig  # noqa: E402
from models.engine.llm_engine import LLMEngine  # noqa: E402
from models.protocol.requests import GenerationRequest, SamplingParams  # noqa: E402
from models.steering.config import SteeringConfig, SteeringSetup  # noqa: E402

STEERING = {
    "expert_adapter": "positive",
    "policies": [
        {"name": "proxy", "kind": "proxy_tuning", "params": {"alpha": 1.5}},
        {"name": "contrast", "kind": "contrastive", "params": {"beta": 0.8,
                                                               "plausibility_alpha": 0.05}},
        {"name": "guard", "kind": "vector_guard",
         "params": {"vector": "v", "positive": ["I am glad"], "negative": ["I am sad"]}},
    ],
}  # fmt: skip
TEXTS = ["Anna has a red ball.", "The blue map is", "Who has the green drum?", "Omar feels"]
N = 12


@pytest.fixture(scope="session")
def toy():
    return resolve_source("builtin:toy")


@pytest.fixture(scope="session")
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    pending = asyncio.all_tasks(loop)  # vLLM's output handler, after the engine shut down
    for task in pending:
        task.cancel()
    loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
    loop.close()


@pytest.fixture(scope="session")
def steering():
    return SteeringSetup(steering=SteeringConfig.model_validate(STEERING),
                         model_source="builtin:toy")  # fmt: skip


@pytest.fixture(scope="session")
def vllm_engine(toy, loop, steering):
    async def build():
        engine = build_engine(EngineConfig(kind="vllm", kv_cache_cpu_gib=0.25), toy.big, steering)
        await engine.start()
        return engine

    engine = loop.run_until_complete(build())
    for name in ("qa", "list"):
        loop.run_until_complete(engine.load_adapter(name, toy.adapters[name]))
    yield engine
    engine.shutdown()


@pytest.fixture(scope="session")
def torch_engine(toy):
    return LLMEngine(EngineConfig(num_kv_blocks=256), toy.big)


@pytest.fixture(scope="session")
def prompts(torch_engine):
    return [torch_engine.tokenizer.encode(t) for t in TEXTS]


def request(rid, prompt, max_tokens=N, params: dict | None = None, **kw) -> GenerationRequest:
    """A greedy request that ignores EOS unless `params` (SamplingParams fields) says else."""
    params = SamplingParams(**{"max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
                               "logprobs": kw.pop("logprobs", None), **(params or {})})
    return GenerationRequest(rid, list(prompt), params, **kw)


def torch_outputs(engine: LLMEngine, requests: list[GenerationRequest]) -> dict[str, list]:
    outs: dict[str, list] = {r.request_id: [] for r in requests}
    for r in requests:
        engine.add_request(r)
    while engine.has_unfinished():
        for out in engine.step():
            outs[out.request_id].append(out)
    return outs


def torch_tokens(engine: LLMEngine, requests: list[GenerationRequest]) -> dict[str, list[int]]:
    return {rid: tokens_of(outs) for rid, outs in torch_outputs(engine, requests).items()}


def vllm_outputs(loop, engine, requests: list[GenerationRequest]) -> dict[str, list]:
    async def one(r):
        return [out async for out in engine.generate(r)]

    async def run():
        return await asyncio.gather(*(one(r) for r in requests))

    return {r.request_id: outs for r, outs in zip(requests, loop.run_until_complete(run()),
                                                  strict=True)}  # fmt: skip


def tokens_of(outs) -> list[int]:
    return [t for out in outs for t in out.token_ids]
