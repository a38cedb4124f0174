"""The Serve path's plumbing through the real app, on the fake engine (tests/fakes/engine.py):
routes, errors, streaming, batching, cancellation, and what a token costs in Ray messages.
The app is the default config with a FakeEngine Generator and no Router, Retriever or Steerer
(a config that needs none of them leaves them out)."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest

from tests.conftest import default_app_args
from tests.serve.conftest import deploy

pytestmark = pytest.mark.serve

MODEL = "tandem"
APP = "plumbing"
STEP_S = 0.005  # the fake engine's step time


def plumbing_args() -> dict:
    args = default_app_args()
    args["model"]["source"] = "builtin:tiny"
    args["engine"] = {"kind": "tests.fakes.engine:FakeEngine", "max_model_len": 512}
    args["adapters"] = []
    args["retrieval"] = {"enabled": False}
    args["steering"] = {}
    gen = args["deployments"]["generator"]
    gen["env"] = {**gen.get("env", {}), "FAKE_ENGINE_STEP_S": str(STEP_S)}
    return args


@pytest.fixture(scope="module")
def base_url(serve_url):
    from ray import serve

    from deployments.app import build_app

    deploy(build_app(plumbing_args()), APP, f"/{APP}")
    yield f"{serve_url}/{APP}"
    serve.delete(APP)


@pytest.fixture(scope="module")
def client(base_url):
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def aclient(base_url):
    return openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0,
                              timeout=60)  # fmt: skip


def chat(client, content="Tell me about Mia.", **kw):
    return client.chat.completions.create(
        model=kw.pop("model", MODEL), messages=[{"role": "user", "content": content}], **kw
    )


def handle(name: str):
    from ray import serve

    return serve.get_deployment_handle(name, app_name=APP)


def test_only_the_needed_deployments_run(base_url):
    from ray import serve

    deployments = serve.status().applications[APP].deployments
    assert set(deployments) == {"Ingress", "Generator"}
    assert httpx.get(f"{base_url}/healthz").json()["status"] == "ok"


def test_chat_greedy_matches_stream(client):
    full = chat(client, temperature=0, max_tokens=12)
    text = full.choices[0].message.content
    assert text and full.choices[0].finish_reason == "length"
    assert full.model_extra["tandem"]["interventions"] == []
    assert full.usage.completion_tokens == 12
    assert full.usage.total_tokens == full.usage.prompt_tokens + 12
    chunks = list(chat(client, temperature=0, max_tokens=12, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_completions_stream_and_not(client):
    full = client.completions.create(model=MODEL, prompt="Mia is", max_tokens=8, temperature=0)
    parts = client.completions.create(model=MODEL, prompt="Mia is", max_tokens=8, temperature=0,
                                      stream=True)  # fmt: skip
    assert "".join(c.choices[0].text for c in parts if c.choices) == full.choices[0].text
    assert full.object == "text_completion" and full.usage.completion_tokens == 8


def test_usage_in_stream_and_seeds(client):
    chunks = list(chat(client, max_tokens=5, stream=True, stream_options={"include_usage": True},
                       extra_body={"ignore_eos": True}))  # fmt: skip
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    a = chat(client, n=2, temperature=1.0, seed=7, max_tokens=10)
    b = chat(client, n=2, temperature=1.0, seed=7, max_tokens=10)
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert a.choices[0].message.content != a.choices[1].message.content  # seeds 7 and 8


def test_stop_string_cuts_text(client):
    text = chat(client, temperature=0, max_tokens=16).choices[0].message.content
    stop = text[5:7]
    stopped = chat(client, temperature=0, max_tokens=16, stop=[stop])
    assert stopped.choices[0].message.content == text[: text.index(stop)]
    assert stopped.choices[0].finish_reason == "stop"


ERROR_CASES = [
    ({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, 404),
    ({"model": "tandem:nope", "messages": [{"role": "user", "content": "hi"}]}, 404),
    ({"model": MODEL}, 400),
    ({"model": MODEL, "messages": []}, 400),
    ({"model": MODEL, "messages": "hi"}, 400),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "n": 0}, 400),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "n": 1000}, 400),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**7}, 400),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400),
    ({"model": MODEL, "messages": [{"role": "user", "content": "word " * 5000}]}, 400),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
      "steering": {"vectors": [{"name": "nope", "coeff": 1}]}}, 404),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
      "steering": {"policy": "nope"}}, 404),
]


@pytest.mark.parametrize("body,status", ERROR_CASES)
def test_bad_requests_get_openai_errors(base_url, body, status):
    r = httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]


def test_malformed_json_and_oversized_body(base_url, client):
    r = httpx.post(f"{base_url}/v1/chat/completions", content=b"{not json",
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    big = b'{"model": "tandem", "messages": [{"role": "user", "content": "' + b"x" * (2 << 20)
    r = httpx.post(f"{base_url}/v1/chat/completions", content=big + b'"}]}', timeout=60,
                   headers={"content-type": "application/json"})  # fmt: skip
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]
    with pytest.raises(openai.NotFoundError):
        chat(client, model="missing-model")
    with pytest.raises(openai.BadRequestError):
        chat(client, max_tokens=-1)


def test_hostile_json_gets_400_and_the_app_answers_after(base_url, client):
    url = f"{base_url}/v1/chat/completions"
    deep = b'{"model": "tandem", "messages": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    surrogate = b'{"model": "tandem", "messages": [{"role": "user", "content": "a\\ud800"}]}'
    for body in (deep, surrogate, b"null", b"[]", b'"s"', b"123"):
        r = httpx.post(url, content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400, (body[:40], r.text)
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = httpx.post(f"{base_url}/v1/completions", json={"model": MODEL, "prompt": [-1]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    r = httpx.post(url, json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                               "seed": 2**64})  # fmt: skip
    assert r.status_code == 400 and r.json()["error"]["param"] == "seed"
    assert httpx.head(f"{base_url}/healthz").status_code == 200
    assert chat(client, max_tokens=3).usage.completion_tokens == 3


def test_routes_without_their_deployment_say_so(base_url, client):
    r = httpx.post(f"{base_url}/v1/embeddings", json={"input": "hi"})
    assert r.status_code == 404 and "retrieval" in r.json()["error"]["message"]
    r = httpx.get(f"{base_url}/v1/vector_stores")
    assert r.status_code == 404 and "retrieval" in r.json()["error"]["message"]


def test_streams_cost_one_ray_message_per_engine_step(aclient):
    """Sixteen concurrent streams batch in the engine, and the Ingress receives one Ray
    message per engine step for all of them (one per token per stream would be 16x); the
    burst is admitted in a few submit calls, not one per request."""
    ingress, generator = handle("Ingress"), handle("Generator")
    before_in = ingress.stats.remote().result()["generator_messages"]
    before_submits = ingress.stats.remote().result()["submit_calls"]
    before_steps = generator.stats.remote().result()["steps"]

    async def one(i: int) -> int:
        stream = await aclient.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"Story {i}"}], max_tokens=32,
            stream=True, stream_options={"include_usage": True})  # fmt: skip
        return [c async for c in stream][-1].usage.completion_tokens

    async def all16():
        return await asyncio.gather(*(one(i) for i in range(16)))

    assert asyncio.run(all16()) == [32] * 16
    stats = generator.stats.remote().result()
    messages = ingress.stats.remote().result()["generator_messages"] - before_in
    steps = stats["steps"] - before_steps
    assert stats["max_running_seen"] > 1
    assert messages <= steps + 2, (messages, steps)  # 16 x 32 = 512 tokens came in these
    submits = ingress.stats.remote().result()["submit_calls"] - before_submits
    assert submits <= 8, submits  # requests that come while a call is out go in the next


def test_a_client_that_leaves_stops_its_request(base_url):
    generator = handle("Generator")
    body = {"model": MODEL, "messages": [{"role": "user", "content": "go on"}],
            "max_tokens": 400, "stream": True}  # fmt: skip
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: {") and '"content": "' in line:
                break  # one token arrived: hang up
    deadline = time.monotonic() + 5
    while generator.stats.remote().result()["num_running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    stats = generator.stats.remote().result()
    assert stats["num_running"] == 0  # 400 tokens at 5 ms a step would still run for 2 s


def test_a_client_that_leaves_does_not_take_the_others_with_it(base_url):
    """The stream that carries every request's tokens is opened by whichever request comes
    first; when that request's client goes away, the stream (and the requests reading it)
    must go on (it once was cancelled with it, and the others hung)."""
    import threading

    time.sleep(1.5)  # the session's stream ends idle: the next request opens a new one
    body = {"model": MODEL, "messages": [{"role": "user", "content": "go on"}],
            "max_tokens": 120, "stream": True}  # fmt: skip
    opened, result = threading.Event(), {}

    def other():
        opened.wait(30)
        with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body, timeout=30) as r:
            result["lines"] = [line for line in r.iter_lines() if line.startswith("data: ")]

    thread = threading.Thread(target=other)
    thread.start()
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: {") and '"content": "' in line:
                opened.set()  # the stream is open (this request opened it): the other starts
                time.sleep(0.2)
                break  # then this client hangs up
    thread.join(40)
    assert result["lines"][-1] == "data: [DONE]"
    assert not any('"error"' in line for line in result["lines"])
