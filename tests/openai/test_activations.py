"""`tandem.activations` through the OpenAI serving layer in-process, over the real torch engine
on builtin:tiny (no Ray): per-token residual-stream vectors in the response and the stream,
bounded, bad requests answered with 400s."""

from __future__ import annotations

import asyncio
import base64
import json

import numpy as np
import pytest

from models.builtin import resolve_source
from models.engine import build_engine
from models.engine.config import EngineConfig
from models.openai.errors import OpenAIError
from models.openai.serving import Backends, OpenAIServing, ServingLimits


@pytest.fixture(scope="module")
def engine():
    eng = build_engine(EngineConfig(kv_cache_cpu_gib=0.05), resolve_source("builtin:tiny").big)
    asyncio.run(eng.start())
    return eng


def serving(engine) -> OpenAIServing:
    return OpenAIServing(
        model_name="tandem", tokenizer=engine.tokenizer,
        backends=Backends(generate=engine.generate),
        limits=ServingLimits(max_model_len=256, vocab_size=len(engine.tokenizer), max_n=4),
    )  # fmt: skip


def body(**kw):
    return {"model": "tandem", "prompt": "Mia is in the park.", "max_tokens": 6,
            "temperature": 0, "ignore_eos": True, **kw}  # fmt: skip


def vectors(obj: dict) -> list[np.ndarray]:
    return [np.frombuffer(base64.b64decode(t), dtype="<f2").reshape(obj["shape"])
            for t in obj["tokens"]]  # fmt: skip


def test_each_token_comes_back_with_its_vectors_in_response_and_stream(engine):
    ask = {"activations": {"layers": [1, 0]}}
    full = asyncio.run(serving(engine).completions(body(tandem=ask)))
    (acts,) = full["tandem"]["activations"]
    assert acts["layers"] == [1, 0] and acts["dtype"] == "float16"
    assert acts["shape"] == [2, 128] and len(acts["tokens"]) == 6
    whole = vectors(acts)
    assert not np.allclose(whole[0][0], whole[0][1])  # two layers, two different states

    async def stream():
        out = []
        async for line in await serving(engine).completions(body(tandem=ask, stream=True)):
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                out += [v for a in chunk.get("tandem", {}).get("activations", [])
                        for v in vectors(a)]  # fmt: skip
        return out

    streamed = asyncio.run(stream())
    assert len(streamed) == 6
    for a, b in zip(whole, streamed, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-2)
    plain = asyncio.run(serving(engine).completions(body()))
    assert "activations" not in plain["tandem"]


@pytest.mark.parametrize("ask, param", [
    ({"activations": {"layers": [0], "probes": ["gloom"]}}, "tandem.activations"),  # no reader
    ({"activations": {"layers": [0, 1]}}, "tandem.activations"),  # 2 x 200 x n=4 > 100
    ({"activations": {"layers": list(range(9))}}, None),
    ({"activations": {"layers": [7]}}, "hidden_layers"),
])  # fmt: skip
def test_bad_activation_requests_are_400s(engine, ask, param, monkeypatch):
    monkeypatch.setattr("models.openai.activations.MAX_ACTIVATION_VECTORS", 100)
    n, max_tokens = (4, 200) if param == "tandem.activations" else (1, 6)
    with pytest.raises(OpenAIError) as err:
        asyncio.run(serving(engine).completions(body(tandem=ask, n=n, max_tokens=max_tokens)))
    assert err.value.status_code == 400
    if param:
        assert err.value.param == param
