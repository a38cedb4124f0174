"""The vLLM engine's sampling and structured output against the torch engine (built-in toy model,
vLLM's CPU build; skipped without vllm): every GenerationRequest sampling field reaches vLLM's
SamplingParams, penalties / min_tokens / logit_bias / stop strings and ids give the torch engine's
greedy tokens, logprobs include the logit bias as the torch engine's do, a seed reproduces a
sampled row, and response_format (json_object, json_schema) and forced tool calls go through
vLLM's own guided decoding (guidance backend) to the torch engine's constrained greedy text,
which parses; a grammar that does not compile is a 400 before vLLM sees it."""

from __future__ import annotations

import dataclasses
import json

import pytest

pytest.importorskip("vllm.engine")  # a real vLLM (not a folder named vllm)

from models.engine.config import EngineConfig  # noqa: E402
from models.engines.vllm.engine import engine_args  # noqa: E402
from models.openai.tools import ChatTools, parse_tool_calls  # noqa: E402
from models.protocol.constraints import OutputConstraint  # noqa: E402
from models.protocol.errors import EngineError  # noqa: E402
from models.protocol.requests import GenerationRequest, SamplingParams  # noqa: E402
from tests.engines_vllm.conftest import (  # noqa: E402
    request,
    tokens_of,
    torch_outputs,
    vllm_outputs,
)

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["who", "n"],
          "properties": {"who": {"type": "string", "maxLength": 12}, "n": {"type": "integer"}}}
FIND_PERSON = {"type": "function", "function": {
    "name": "find_person", "parameters": {
        "type": "object", "additionalProperties": False, "required": ["who"],
        "properties": {"who": {"type": "string", "enum": ["Mia", "Tom", "Ava"]}}}}}  # fmt: skip


def text_of(outs) -> str:
    return "".join(o.text for o in outs)


def test_every_sampling_field_reaches_vllm(vllm_engine):
    p = SamplingParams(max_tokens=7, temperature=0.7, top_p=0.9, top_k=5, seed=3, stop=["x"],
                       stop_token_ids=[4], ignore_eos=True, logprobs=2, logit_bias={5: 1.5},
                       presence_penalty=0.5, frequency_penalty=0.25, repetition_penalty=1.2,
                       min_tokens=3)  # fmt: skip
    got = vllm_engine.sampling_params(GenerationRequest("m", [1], p))
    for field in dataclasses.fields(SamplingParams):  # a new field fails here until mapped
        assert getattr(got, field.name) == getattr(p, field.name), field.name


def test_penalties_min_tokens_bias_and_stops_give_the_torch_engine_tokens(
        loop, vllm_engine, torch_engine, prompts):  # fmt: skip
    prompt = prompts[1]
    plain = torch_outputs(torch_engine, [request("plain", prompt, max_tokens=16)])["plain"]
    plain_tokens, plain_text = tokens_of(plain), text_of(plain)
    stop_id = plain_tokens[3]
    cases = {
        "presence": dict(presence_penalty=1.5), "frequency": dict(frequency_penalty=1.2),
        "repetition": dict(repetition_penalty=1.8), "bias": dict(logit_bias={plain_tokens[5]: -100.0}),
        "stop_ids": dict(stop_token_ids=[stop_id]),
        "min_tokens": dict(stop_token_ids=[stop_id], min_tokens=plain_tokens.index(stop_id) + 3),
        "stop": dict(stop=[plain_text[len(plain_text) // 2:][:3]]),
    }  # fmt: skip
    reqs = [request(name, prompt, max_tokens=16, params=params) for name, params in cases.items()]
    want = torch_outputs(torch_engine, reqs)
    got = vllm_outputs(loop, vllm_engine, reqs)
    for name in cases:
        assert tokens_of(got[name]) == tokens_of(want[name]), name
        assert text_of(got[name]) == text_of(want[name]), name
        assert got[name][-1].finish_reason == want[name][-1].finish_reason, name
    for name in ("presence", "frequency", "repetition", "bias"):
        assert tokens_of(got[name]) != plain_tokens, f"{name} changed nothing"
    assert got["stop_ids"][-1].finish_reason == "stop"
    assert len(tokens_of(got["min_tokens"])) > len(tokens_of(got["stop_ids"]))
    assert len(text_of(got["stop"])) < len(plain_text)


def test_logprobs_include_the_logit_bias_as_the_torch_engine_does(
        loop, vllm_engine, torch_engine, prompts):  # fmt: skip
    r = request("lpb", prompts[2], max_tokens=4, logprobs=3, params={"logit_bias": {7: 3.0}})
    want = [lp for out in torch_outputs(torch_engine, [r])["lpb"] for lp in out.logprobs]
    got = [lp for out in vllm_outputs(loop, vllm_engine, [r])["lpb"] for lp in out.logprobs]
    assert [g.token_id for g in got] == [w.token_id for w in want]
    for g, w in zip(got, want, strict=True):
        assert g.logprob == pytest.approx(w.logprob, abs=1e-3)
        assert [i for i, _ in g.top] == [i for i, _ in w.top]
        assert [v for _, v in g.top] == pytest.approx([v for _, v in w.top], abs=1e-3)


def test_a_seed_reproduces_a_sampled_row(loop, vllm_engine, prompts):
    def sampled(rid: str, seed: int) -> GenerationRequest:
        return request(rid, prompts[0], max_tokens=16, params={"temperature": 1.0, "seed": seed})

    got = vllm_outputs(loop, vllm_engine, [sampled("s1", 7), sampled("s2", 7), sampled("s3", 8),
                                           request("other", prompts[3])])  # fmt: skip
    assert tokens_of(got["s1"]) == tokens_of(got["s2"])
    assert tokens_of(got["s1"]) != tokens_of(got["s3"])


def test_structured_output_through_vllm_guided_decoding_equals_the_torch_engine(
        loop, vllm_engine, torch_engine, prompts):  # fmt: skip
    assert vllm_engine.capabilities.structured_output
    tools = ChatTools.model_validate({"tools": [FIND_PERSON], "tool_choice": "required",
                                      "parallel_tool_calls": False})  # fmt: skip
    constraints = {"schema": OutputConstraint("json_schema", json.dumps(SCHEMA)),
                   "object": OutputConstraint("json_object"), "tool": tools.constraint()}
    reqs = [request(f"{kind}{i}", p, max_tokens=96, params={"ignore_eos": False}, constraint=c)
            for kind, c in constraints.items() for i, p in enumerate(prompts[:2])]  # fmt: skip
    want = torch_outputs(torch_engine, reqs)
    got = vllm_outputs(loop, vllm_engine, reqs)
    for r in reqs:
        rid = r.request_id
        text = text_of(got[rid])
        assert got[rid][-1].finish_reason == "stop", (rid, text)
        assert text == text_of(want[rid]), rid
        if rid.startswith("schema"):
            assert set(json.loads(text)) == {"who", "n"}
        elif rid.startswith("object"):
            assert isinstance(json.loads(text), dict)
        else:
            content, calls = parse_tool_calls(text)
            assert [c["function"]["name"] for c in calls] == ["find_person"], text
            assert json.loads(calls[0]["function"]["arguments"])["who"] in ("Mia", "Tom", "Ava")
    free = vllm_outputs(loop, vllm_engine, [request("free", prompts[0], max_tokens=8)])["free"]
    assert not text_of(free).startswith("{")
    # tool_choice auto: served free here (the optional call grammar is not passed to vLLM);
    # the torch engine's grammar leaves the same free text as it is
    auto = ChatTools.model_validate({"tools": [FIND_PERSON], "tool_choice": "auto"}).constraint()
    reqs = [request(f"auto{i}", p, max_tokens=40, params={"ignore_eos": False}, constraint=auto)
            for i, p in enumerate(prompts[:2])]  # fmt: skip
    want, got = torch_outputs(torch_engine, reqs), vllm_outputs(loop, vllm_engine, reqs)
    for r in reqs:
        assert text_of(got[r.request_id]) == text_of(want[r.request_id]), r.request_id


def test_a_grammar_that_does_not_compile_is_a_400_before_vllm(vllm_engine, prompts):
    for bad in (OutputConstraint("json_schema", "[1]"), OutputConstraint("lark", "start: nope")):
        with pytest.raises(EngineError) as e:
            vllm_engine.check_request(request("bad", prompts[0], constraint=bad))
        assert e.value.status_code == 400 and e.value.param == "response_format"


def test_structured_output_off_leaves_vllm_without_guided_decoding():
    args = engine_args(EngineConfig(kind="vllm", structured_output=None), "/m", None)
    assert "structured_outputs_config" not in args and "logits_processors" not in args
    args = engine_args(EngineConfig(kind="vllm"), "/m", None)
    assert args["structured_outputs_config"]["backend"] == "guidance"
    assert args["enable_prefix_caching"] and args["logprobs_mode"] == "processed_logprobs"
    assert not engine_args(EngineConfig(kind="vllm", prefix_caching=False), "/m",
                           None)["enable_prefix_caching"]  # fmt: skip
