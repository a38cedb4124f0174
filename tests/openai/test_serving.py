"""The OpenAI serving layer in-process over the real torch engine on builtin:tiny (no Ray)."""

from __future__ import annotations

import asyncio
import json

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


class Recorder:
    """Wraps the engine's generate and keeps the GenerationRequests it was given."""

    def __init__(self, engine):
        self.engine = engine
        self.requests = []

    def generate(self, request):
        self.requests.append(request)
        return self.engine.generate(request)


def make_serving(engine, **backends):
    rec = Recorder(engine)
    serving = OpenAIServing(
        model_name="tandem",
        tokenizer=engine.tokenizer,
        backends=Backends(generate=rec.generate, **backends),
        limits=ServingLimits(max_model_len=256, vocab_size=len(engine.tokenizer), max_n=4,
                             policies={"guard": {"threshold": 0.5}}),
    )
    return serving, rec


def run(coro):
    return asyncio.run(coro)


def chat_body(**kw):
    return {"model": "tandem", "messages": [{"role": "user", "content": "Where is Mia?"}], **kw}


def test_n_fans_out_with_derived_seeds(engine):
    serving, rec = make_serving(engine)
    r = run(serving.chat(chat_body(n=3, seed=10, max_tokens=4)))
    assert [c["index"] for c in r["choices"]] == [0, 1, 2]
    assert [q.params.seed for q in rec.requests] == [10, 11, 12]
    assert len({q.request_id for q in rec.requests}) == 3
    assert r["usage"]["completion_tokens"] == sum(4 if c["finish_reason"] == "length" else 0
                                                  for c in r["choices"]) or r["usage"]["completion_tokens"] > 0


def test_stream_equals_non_stream_greedy(engine):
    serving, _ = make_serving(engine)
    full = run(serving.chat(chat_body(temperature=0, max_tokens=10)))

    async def collect():
        text, events = "", []
        async for line in await serving.chat(chat_body(temperature=0, max_tokens=10, stream=True)):
            events.append(line)
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                for c in chunk["choices"]:
                    text += c["delta"].get("content") or ""
        return text, events

    text, events = run(collect())
    assert text == full["choices"][0]["message"]["content"]
    assert events[-1] == "data: [DONE]\n\n"


def test_rag_sources_go_into_the_prompt(engine):
    hits = [{"chunk_id": "c1", "vector_store_id": "vs_1", "file_id": "f1", "filename": "mia.txt", "score": 0.9,
             "text": "Mia keeps the red kite in the barn."}]

    async def search(query, store_ids, top_k, threshold):
        assert store_ids == ["vs_1"] and top_k == 2
        from models.retrieval.records import SearchHit

        return [SearchHit(**h) for h in hits]

    serving, rec = make_serving(engine, search=search)
    r = run(serving.chat(chat_body(max_tokens=2, rag={"vector_store_ids": ["vs_1"], "top_k": 2})))
    prompt = engine.tokenizer.decode(rec.requests[0].prompt_token_ids)
    assert "[1] Mia keeps the red kite in the barn." in prompt and "as [n]" in prompt
    assert r["tandem"]["sources"][0]["filename"] == "mia.txt"


def test_auto_routes_through_the_router(engine):
    async def route(prompt):
        return {"adapter": "qa", "confidence": 0.93, "candidates": [["qa", 0.93]], "weights": None}

    async def adapters():
        return ["qa", "rewrite"]

    serving, rec = make_serving(engine, route=route, adapters=adapters)
    with pytest.raises(OpenAIError) as err:  # the engine has no adapter 'qa' loaded
        run(serving.chat(chat_body(model="tandem:auto", max_tokens=2)))
    assert err.value.status_code == 404 and "qa" in err.value.message
    assert rec.requests[0].adapter == "qa"


@pytest.mark.parametrize("body,status,param", [
    ({"model": "other", "messages": [{"role": "user", "content": "x"}]}, 404, "model"),
    ({"model": "tandem:legal", "messages": [{"role": "user", "content": "x"}]}, 404, "model"),
    ({"model": "tandem", "messages": []}, 400, "messages"),
    ({"model": "tandem", "messages": [{"role": "user", "content": "x"}], "n": 9}, 400, "n"),
    ({"model": "tandem", "messages": [{"role": "user", "content": "x"}], "max_tokens": 300}, 400, "max_tokens"),
    ({"model": "tandem", "messages": [{"role": "user", "content": "x " * 400}]}, 400, "messages"),
    ({"model": "tandem", "messages": [{"role": "user", "content": "x"}], "stop": ["a"] * 5}, 400, "stop"),
    ({"model": "tandem", "messages": [{"role": "user", "content": "x"}], "logit_bias": {"999999": 1}}, 400, "logit_bias"),
    ({"model": "tandem", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, None),
    ({"model": "tandem", "messages": [{"role": "user", "content": "x"}], "steering": {"policy": "x"}}, 404, "steering.policy"),
    ({"model": "tandem", "messages": [{"role": "user", "content": "x"}], "steering": {"params": {"alpha": 2}}}, 400, "steering.params"),
    ({"model": "tandem", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, 400, None),
    ("not an object", 400, None),
    ({"model": "tandem", "messages": [{"role": "user", "content": "x"}], "seed": 2**64}, 400, "seed"),
    ({"model": "tandem", "messages": [{"role": "user", "content": "x"}], "top_k": 2**63}, 400, "top_k"),
])
def test_bad_requests(engine, body, status, param):
    serving, rec = make_serving(engine)
    with pytest.raises(OpenAIError) as err:
        run(serving.chat(body))
    assert err.value.status_code == status
    if param:
        assert err.value.param == param
    assert rec.requests == []  # nothing reached the engine


def test_steering_request_translated(engine):
    async def vectors():
        return ["positive"]

    serving, rec = make_serving(engine, vectors=vectors)
    with pytest.raises(OpenAIError):  # the engine has no 'positive' vector registered
        run(serving.chat(chat_body(max_tokens=2, steering={
            "vectors": [{"name": "positive", "coeff": 3.0, "layers": [1, 2]}],
            "policy": "guard", "params": {"threshold": 0.7}, "mode": "sync", "every": 2})))
    req = rec.requests[0]
    assert req.steer_vectors[0].name == "positive" and req.steer_vectors[0].layers == [1, 2]
    assert req.steering.policy == "guard" and req.steering.mode == "sync"
    assert req.steering.params == {"threshold": 0.7} and req.steering.every == 2


def test_completions_prompt_forms_and_echo(engine):
    serving, rec = make_serving(engine)
    ids = engine.tokenizer.encode("Mia is", add_special_tokens=False)
    a = run(serving.completions({"model": "tandem", "prompt": "Mia is", "max_tokens": 3, "temperature": 0}))
    b = run(serving.completions({"model": "tandem", "prompt": ids, "max_tokens": 3, "temperature": 0}))
    assert a["choices"][0]["text"] == b["choices"][0]["text"]
    c = run(serving.completions({"model": "tandem", "prompt": ["Mia is", "Tom has"], "max_tokens": 2}))
    assert len(c["choices"]) == 2
    e = run(serving.completions({"model": "tandem", "prompt": "Mia is", "max_tokens": 3,
                                 "temperature": 0, "echo": True}))
    assert e["choices"][0]["text"] == "Mia is" + a["choices"][0]["text"]


def test_a_generation_that_fails_midway_reports_why(engine):
    from models.protocol.outputs import RequestOutput

    async def failing(request):
        yield RequestOutput(request.request_id, [5], "Mia", num_generated_tokens=1)
        yield RequestOutput(request.request_id, [], "", finished=True, finish_reason="error",
                            num_generated_tokens=1, error="the steering policy raised: boom")

    serving = OpenAIServing(model_name="tandem", tokenizer=engine.tokenizer,
                            backends=Backends(generate=failing),
                            limits=ServingLimits(max_model_len=256, vocab_size=len(engine.tokenizer)))
    r = run(serving.chat(chat_body(max_tokens=4)))
    assert r["choices"][0]["finish_reason"] == "error" and r["choices"][0]["message"]["content"] == "Mia"
    assert r["tandem"]["errors"] == [{"index": 0, "message": "the steering policy raised: boom"}]


def test_overload_and_outage_answers_say_when_to_retry():
    from deployments.http import error_response
    from models.protocol.errors import EngineFailedError, EngineOverloadedError

    busy = error_response(EngineOverloadedError("the engine queue is full"))
    down = error_response(EngineFailedError("the engine failed"))
    assert (busy.status_code, busy.headers["retry-after"]) == (429, "1")
    assert (down.status_code, down.headers["retry-after"]) == (503, "5")
    assert b'"code":"engine_failed"' in down.body.replace(b" ", b"")


def test_bad_policy_params_are_a_400_naming_the_field_before_the_engine(engine):
    from models.steering.config import SteeringConfig
    from models.steering.policies.admission import PolicyAdmission

    steering = SteeringConfig.model_validate({"policies": [
        {"name": "guard", "kind": "vector_guard", "params": {"vector": "positive"}},
        {"name": "contrastive", "kind": "contrastive"}]})

    async def vectors():
        return ["positive"]

    serving, rec = make_serving(engine, vectors=vectors)
    serving.limits.policies = {p.name: dict(p.params) for p in steering.policies}
    serving.limits.policy_admission = PolicyAdmission.from_config(steering, num_layers=2)
    for policy, params, param, status in [
        ("guard", {"threshold": "x"}, "steering.params.threshold", 400),
        ("guard", {"window": 0}, "steering.params.window", 400),
        ("guard", {"unknown": 1}, "steering.params.unknown", 400),
        ("guard", {"coeff": 1e30}, "steering.params.coeff", 400),
        ("guard", {"vector": "nope"}, "steering.params.vector", 404),
        ("contrastive", {"beta": -1e30}, "steering.params.beta", 400),
    ]:
        with pytest.raises(OpenAIError) as err:
            run(serving.chat(chat_body(max_tokens=2, steering={"policy": policy,
                                                               "params": params})))
        assert (err.value.status_code, err.value.param) == (status, param), err.value.message
        assert err.value.type == ("invalid_request_error" if status == 400 else "not_found_error")
    assert rec.requests == []  # nothing reached the engine


def sse_payloads(lines: list[str]) -> list:
    return [json.loads(line[6:]) if line.startswith("data: {") else line.strip()
            for line in lines]  # fmt: skip


def collect_stream(serving, body) -> list:
    async def go():
        return [line async for line in await serving.chat(body)]

    return sse_payloads(run(go()))


def test_a_stream_that_fails_midway_ends_with_an_error_event_then_done(engine):
    from models.protocol.errors import EngineFailedError
    from models.protocol.outputs import Intervention, RequestOutput

    async def dying(request):  # a replica that dies after one token (plumbing fake)
        yield RequestOutput(request.request_id, [5], "Mia", num_generated_tokens=1)
        raise EngineFailedError("the engine failed: device lost")

    async def failing_row(request):  # a row the engine failed after one token
        yield RequestOutput(request.request_id, [5], "Mia", num_generated_tokens=1,
                            interventions=[Intervention(0, "steerer_timeout", {"message": "slow"})])
        yield RequestOutput(request.request_id, [], "", finished=True, finish_reason="error",
                            num_generated_tokens=1, error="sampling row 3 failed")

    limits = ServingLimits(max_model_len=256, vocab_size=len(engine.tokenizer))
    dead = OpenAIServing(model_name="tandem", tokenizer=engine.tokenizer,
                         backends=Backends(generate=dying), limits=limits)
    events = collect_stream(dead, chat_body(max_tokens=4, stream=True))
    assert events[-2]["error"]["code"] == "engine_failed" and events[-1] == "data: [DONE]"
    assert events[-2]["error"]["type"] == "service_unavailable_error"

    row = OpenAIServing(model_name="tandem", tokenizer=engine.tokenizer,
                        backends=Backends(generate=failing_row), limits=limits)
    events = collect_stream(row, chat_body(max_tokens=4, stream=True))
    last_chunk, error, done = events[-3:]
    assert last_chunk["choices"][0]["finish_reason"] == "error"
    tandem = last_chunk["tandem"]
    assert tandem["errors"] == [{"index": 0, "message": "sampling row 3 failed"}]
    assert tandem["unsteered_because"] == [{"index": 0, "reason": "steerer_timeout",
                                            "message": "slow"}]
    assert [i["action"] for i in tandem["interventions"]] == ["steerer_timeout"]
    assert "sampling row 3 failed" in error["error"]["message"] and done == "data: [DONE]"
    full = run(row.chat(chat_body(max_tokens=4)))  # the same tandem as a non-streamed answer
    assert full["tandem"]["unsteered_because"] == tandem["unsteered_because"]


def test_the_last_chunk_of_a_healthy_stream_carries_tandem(engine):
    serving, _ = make_serving(engine)
    events = collect_stream(serving, chat_body(max_tokens=3, n=2, stream=True))
    assert events[-1] == "data: [DONE]" and not any("error" in e for e in events[:-1])
    assert events[-2]["tandem"]["interventions"] == []
    assert "errors" not in events[-2]["tandem"] and "unsteered_because" not in events[-2]["tandem"]
