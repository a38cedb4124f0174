"""Speculative decoding through the OpenAI serving layer in-process, over the real torch engine
on the built-in toy pair with the small model attached as drafter the way the Generator
attaches it (models.steering.drafter.attach_drafter): greedy text identical with and without
`tandem.speculative`, streamed and not, beside rows that cannot be speculated (penalties,
activations) which say why; bad values are 400s naming the field."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from models.builtin import resolve_source
from models.config import TandemConfig
from models.engine import build_engine
from models.openai.errors import OpenAIError
from models.openai.serving import Backends, OpenAIServing, ServingLimits
from models.steering.config import SteeringSetup
from models.steering.drafter import attach_drafter
from tests.openai.test_activations import vectors

PROMPTS = ["Mia is in the park. Tom", "Rewrite in a positive tone: the old dog is sad.",
           "Question: who has the red ball? Mia"]  # fmt: skip


def make_serving(speculative: dict) -> OpenAIServing:
    config = TandemConfig.model_validate(
        {"model": {"source": "builtin:toy"},
         "engine": {"kv_cache_cpu_gib": 0.05, "max_model_len": 512, "speculative": speculative}}
    )  # fmt: skip
    engine = build_engine(config.engine, resolve_source("builtin:toy").big)
    setup = SteeringSetup(steering=config.steering, model_source=config.model.source,
                          max_model_len=config.engine.max_model_len)  # fmt: skip

    async def start():
        await engine.start()
        return await attach_drafter(engine, setup, config.engine.speculative)

    attached = asyncio.run(start())
    assert attached == (speculative.get("drafter") == "small_model" or speculative.get("k", 0) > 0)
    return OpenAIServing(
        model_name="tandem", tokenizer=engine.tokenizer,
        backends=Backends(generate=engine.generate),
        limits=ServingLimits(max_model_len=512, vocab_size=len(engine.tokenizer), max_n=4),
    )  # fmt: skip


@pytest.fixture(scope="module")
def serving():
    """Drafter loaded, off unless a request asks (k = 0 by default), max_k 6."""
    return make_serving({"drafter": "small_model", "max_k": 6})


def body(prompt: str, **kw) -> dict:
    return {"model": "tandem", "prompt": prompt, "max_tokens": 16, "temperature": 0,
            "ignore_eos": True, **kw}  # fmt: skip


async def streamed(serving, request: dict) -> tuple[str, list[int], dict]:
    """The text, the tokens per content chunk, and the last chunk's tandem object."""
    text, sizes, tandem = "", [], {}
    async for line in await serving.completions({**request, "stream": True}):
        if line.startswith("data: {"):
            chunk = json.loads(line[6:])
            for choice in chunk["choices"]:
                text += choice["text"]
                sizes.append(len(serving.tokenizer(choice["text"]).input_ids))
            tandem = chunk.get("tandem", tandem)
    return text, sizes, tandem


def test_greedy_text_is_identical_with_and_without_speculation_streamed(serving):
    """Two rows at once each way; the speculated ones stream several tokens per chunk."""
    ask = {"speculative": {"k": 4}}

    async def run():
        plain = await asyncio.gather(*(serving.completions(body(p)) for p in PROMPTS[:2]))
        spec = await asyncio.gather(*(streamed(serving, body(p, tandem=ask)) for p in PROMPTS[:2]))
        return plain, spec

    plain, spec = asyncio.run(run())
    for a, (text, _sizes, tandem) in zip(plain, spec, strict=True):
        assert text == a["choices"][0]["text"]
        assert "speculative" not in a["tandem"]
        report = tandem["speculative"]
        assert report["k"] == 4 and 0 < report["proposed"]
        assert 0 <= report["accepted"] <= report["proposed"]
    assert any(t["speculative"]["accepted"] for _, _, t in spec)  # the pair agrees at times
    assert max(n for _, sizes, _ in spec for n in sizes) > 1


def test_rows_that_cannot_be_speculated_say_why_and_the_others_still_are(serving):
    async def run():
        return await asyncio.gather(
            serving.completions(body(PROMPTS[0], max_tokens=8, tandem={"speculative": {"k": 3}})),
            serving.completions(body(PROMPTS[1], max_tokens=4, presence_penalty=0.5,
                                     tandem={"speculative": {"k": 3}})),
            serving.completions(body(PROMPTS[2], max_tokens=8, tandem={
                "speculative": {"k": 3}, "activations": {"layers": [0]}})),
            serving.completions(body(PROMPTS[2], max_tokens=8,
                                     tandem={"activations": {"layers": [0]}})),
        )  # fmt: skip

    spec, penalized, captured, captured_plain = asyncio.run(run())
    assert spec["tandem"]["speculative"]["proposed"] > 0
    for response, why in ((penalized, "penalties"), (captured, "hidden states")):
        assert "speculative" not in response["tandem"]
        (off,) = response["tandem"]["unspeculated_because"]
        assert off["index"] == 0 and why in off["reason"]
    assert captured["choices"][0]["text"] == captured_plain["choices"][0]["text"]
    # the same states, up to rounding: beside verify rows the step runs another kernel path
    (got,), (want,) = captured["tandem"]["activations"], captured_plain["tandem"]["activations"]
    assert len(got["tokens"]) == len(want["tokens"]) == 8
    assert np.allclose(vectors(got), vectors(want), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("tandem,param", [
    ({"speculative": {"k": 99}}, "tandem.speculative.k"),  # beyond any k
    ({"speculative": {"k": -1}}, "tandem.speculative.k"),
    ({"speculative": {"k": 7}}, "tandem.speculative.k"),  # beyond this server's max_k (6)
    ({"speculative": True}, "tandem.speculative"),
    ({"speculative": {"k": 2, "depth": 1}}, "tandem.speculative.depth"),
])  # fmt: skip
def test_bad_values_are_400s_naming_the_field(serving, tandem, param):
    with pytest.raises(OpenAIError) as err:
        asyncio.run(serving.completions(body(PROMPTS[0], tandem=tandem)))
    assert err.value.status_code == 400 and err.value.param == param


def test_without_a_drafter_asking_is_a_400_and_false_is_fine():
    plain = make_serving({})
    with pytest.raises(OpenAIError) as err:
        asyncio.run(plain.completions(body(PROMPTS[0], tandem={"speculative": {"k": 2}})))
    assert err.value.status_code == 400 and err.value.param == "tandem.speculative"
    assert "no drafter" in err.value.message
    out = asyncio.run(plain.completions(body(PROMPTS[0], tandem={"speculative": False})))
    assert out["choices"][0]["text"] and "unspeculated_because" not in out["tandem"]
