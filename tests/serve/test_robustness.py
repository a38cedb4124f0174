"""No request can hurt another, through the real app over HTTP (issue 19): key tiers, uploads
refused before their body is read, protected configured state, timeouts, backpressure, a
schema-driven fuzz of every route, and a Generator replica killed mid-stream.

The Generator runs the fake engine (tests/fakes/engine.py: a stand-in with no model, so the
Generator's restart after the kill takes seconds); the Ingress, Router, Retriever and their
routes are the real ones. Adapters loaded at run time go through the real admin route, the
on-disk record (models/routing/registry.py) and the Router's retrained head.
"""

from __future__ import annotations

import json
import shutil
import socket
import time
import zlib
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import openai
import pytest

from tests.conftest import default_app_args
from tests.serve.conftest import deploy

pytestmark = pytest.mark.serve

APP = "robust"
USE, ADMIN = "sk-use", "sk-admin"
STEP_S = 0.005
TIMEOUT_S = 2.0  # server.request_timeout_s: 400 tokens at STEP_S run past it
AS_USER = {"Authorization": f"Bearer {USE}"}
AS_ADMIN = {"Authorization": f"Bearer {ADMIN}"}
QA_EXAMPLES = next(a["examples"] for a in default_app_args()["adapters"] if a["name"] == "qa")


def robust_args(tmp) -> dict:
    args = default_app_args()
    args["model"]["source"] = "builtin:tiny"
    args["engine"] = {"kind": "tests.fakes.engine:FakeEngine", "max_model_len": 512,
                      "max_num_seqs": 3, "max_queue_len": 2}  # a burst of 40 fills it: 429
    # a configured adapter without examples: the Router exists but embeds nothing until taught
    args["adapters"] = [{"name": "qa", "path": "builtin:qa"}]
    args["router"] = {"adapter_roots": [str(tmp / "adapters")]}
    args["retrieval"] = {"data_dir": str(tmp / "retrieval"), "builtin_documents": False}
    args["steering"] = {"vector_dir": str(tmp / "vectors"),
                        "vectors": [{"name": "positive", "path": str(tmp / "positive.gguf")}]}
    args["server"] = {"api_keys": [USE], "admin_api_keys": [ADMIN], "default_max_tokens": 8,
                      "state_dir": str(tmp / "state"), "request_timeout_s": TIMEOUT_S}
    d = args["deployments"]
    d["generator"] = {**d["generator"], "max_ongoing_requests": 3, "max_queued_requests": 2}
    d["generator"]["env"] = {**d["generator"].get("env", {}), "FAKE_ENGINE_STEP_S": str(STEP_S)}
    return args


def tiny_vector(name: str, path) -> bytes:
    """A small steering vector for the tiny model, saved as GGUF at `path`."""
    import torch

    from models.builtin import resolve_source
    from models.steering.vectors import SteeringVector, save_gguf

    config = json.loads((Path(resolve_source("builtin:tiny").big) / "config.json").read_text())
    save_gguf(SteeringVector(name, {1: torch.full((config["hidden_size"],), 0.1)}), path)
    return Path(path).read_bytes()


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    from models.builtin import resolve_source

    root = tmp_path_factory.mktemp("robust")
    shutil.copytree(resolve_source("builtin:tiny").adapters["qa"], root / "adapters" / "qa_copy")
    tiny_vector("positive", root / "positive.gguf")  # a configured vector, from a file
    return root


@pytest.fixture(scope="module")
def base_url(serve_url, tmp):
    from ray import serve

    from deployments.app import build_app

    deploy(build_app(robust_args(tmp)), APP, f"/{APP}")
    yield f"{serve_url}/{APP}"
    serve.delete(APP)


def chat_body(content="Tell me about Mia.", **kw) -> dict:
    return {"model": "tandem", "messages": [{"role": "user", "content": content}], **kw}


def assert_openai_error(r: httpx.Response | dict, status: int | None = None) -> dict:
    body = r if isinstance(r, dict) else r.json()
    if status is not None:
        assert r.status_code == status, r.text
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]


# ---- key tiers ------------------------------------------------------------------------------


def test_key_tiers(base_url):
    assert httpx.get(f"{base_url}/healthz").status_code == 200
    for path in ("/v1/models", "/openapi.json", "/docs"):
        assert_openai_error(httpx.get(f"{base_url}{path}"), 401)
        assert httpx.get(f"{base_url}{path}", headers=AS_USER).status_code == 200
    r = httpx.post(f"{base_url}/v1/chat/completions", json=chat_body(), headers=AS_USER, timeout=30)
    assert r.status_code == 200, r.text
    load = {"lora_name": "x", "lora_path": "qa_copy"}
    for route, body in [("/v1/load_lora_adapter", load), ("/v1/unload_lora_adapter", {"lora_name": "x"}),
                        ("/v1/steering/vectors/extract", {"name": "v", "positive": ["a"], "negative": ["b"]})]:
        err = assert_openai_error(httpx.post(f"{base_url}{route}", json=body, headers=AS_USER), 403)
        assert err["type"] == "permission_error" and err["code"] == "admin_key_required"
    assert_openai_error(httpx.delete(f"{base_url}/v1/files/file-x", headers=AS_USER), 403)
    assert httpx.get(f"{base_url}/v1/files", headers=AS_USER).status_code == 200
    assert_openai_error(httpx.delete(f"{base_url}/v1/files/file-x", headers=AS_ADMIN), 404)


def test_configured_adapters_and_vectors_are_protected(base_url, tmp):
    unload = httpx.post(f"{base_url}/v1/unload_lora_adapter", json={"lora_name": "qa"},
                        headers=AS_ADMIN, timeout=30)
    assert assert_openai_error(unload, 409)["code"] == "configured_adapter"
    over = httpx.post(f"{base_url}/v1/load_lora_adapter", headers=AS_ADMIN, timeout=30,
                      json={"lora_name": "qa", "lora_path": "qa_copy"})
    assert assert_openai_error(over, 409)["param"] == "lora_name"
    vector = tmp / "positive.gguf"
    vector.write_bytes(b"GGUF-not-really")
    r = httpx.post(f"{base_url}/v1/steering/vectors", headers=AS_ADMIN, timeout=30,
                   files={"file": ("positive.gguf", vector.read_bytes())})
    assert assert_openai_error(r, 409)["code"] == "configured_vector"
    r = httpx.post(f"{base_url}/v1/chat/completions", headers=AS_USER, timeout=30,
                   json=chat_body(model="tandem:qa", max_tokens=2))
    assert r.status_code == 200, r.text
    r = httpx.delete(f"{base_url}/v1/steering/vectors/positive", headers=AS_ADMIN)
    assert assert_openai_error(r, 409)["code"] == "configured_vector"
    assert_openai_error(httpx.delete(f"{base_url}/v1/steering/vectors/nope", headers=AS_ADMIN), 404)


# ---- bodies: refused before they are read -----------------------------------------------------


def raw_request(base_url: str, head: str, wait_s: float = 5.0) -> tuple[int, dict, float]:
    """Send only a request's head (no body) on a socket; the status and JSON of the answer and
    how long it took. A server that waited for the body would not answer at all."""
    url = urlsplit(base_url)
    started = time.monotonic()
    with socket.create_connection((url.hostname, url.port), timeout=wait_s) as s:
        s.sendall(head.replace("PREFIX", url.path).encode())
        data = b""
        while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    head_part, _, body = data.partition(b"\r\n\r\n")
    return int(head_part.split()[1]), json.loads(body), time.monotonic() - started


@pytest.mark.parametrize("key, status", [(None, 401), (USE, 413)])
def test_upload_refused_before_its_body(base_url, key, status):
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    head = (f"POST PREFIX/v1/files HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: 300000000\r\n"
            "Content-Type: multipart/form-data; boundary=b\r\n\r\n")
    code, body, took = raw_request(base_url, head)
    assert code == status and took < 5
    assert_openai_error(body)


def test_bodies_over_the_limit_are_cut_while_read(base_url):
    def chunks(total: int):  # no Content-Length: the guard counts as the body arrives
        sent = 0
        while sent < total:
            sent += 65536
            yield b" " * 65536

    for route in ("/v1/chat/completions", "/v1/vector_stores"):
        r = httpx.post(f"{base_url}{route}", content=chunks(3 << 20), timeout=30,
                       headers={**AS_USER, "Content-Type": "application/json"})
        assert assert_openai_error(r, 413)["code"] == "request_too_large"
    r = httpx.post(f"{base_url}/v1/vector_stores", headers=AS_USER, timeout=30,
                   json={"name": "x" * (2 << 20)})
    assert_openai_error(r, 413)


# ---- time and backpressure --------------------------------------------------------------------


def test_a_request_past_its_timeout_answers_504(base_url):
    body = chat_body(max_tokens=400, temperature=0)
    started = time.monotonic()
    r = httpx.post(f"{base_url}/v1/chat/completions", json=body, headers=AS_USER, timeout=30)
    assert assert_openai_error(r, 504)["type"] == "timeout_error"
    assert time.monotonic() - started < TIMEOUT_S + 1.5
    events = []
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", headers=AS_USER, timeout=30,
                      json={**body, "stream": True}) as s:
        assert s.status_code == 200
        events = [line[6:] for line in s.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["code"] == "timeout"
    assert len(events) > 3  # tokens came before the timeout


def test_a_responses_stream_past_its_timeout_ends_as_the_sdk_expects(base_url):
    """A Responses stream cut by the deadline ends with `error` and `response.failed` (no
    chat chunk, no [DONE]), and the SDK reads it to the end."""
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key=USE, max_retries=0)
    started = time.monotonic()
    events = list(client.responses.create(model="tandem", input="Tell me a long story.",
                                          max_output_tokens=400, temperature=0, stream=True))
    assert time.monotonic() - started < TIMEOUT_S + 3
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created" and "response.output_text.delta" in kinds
    assert kinds[-2:] == ["error", "response.failed"]
    assert events[-2].code == "timeout"
    failed = events[-1].response
    assert failed.status == "failed" and failed.error.code == "timeout"


def test_a_full_generator_queue_answers_429(base_url):
    import asyncio

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(headers=AS_USER, timeout=60) as c:
            return await asyncio.gather(*(c.post(f"{base_url}/v1/completions", json={
                "model": "tandem", "prompt": f"story {i}", "max_tokens": 4}) for i in range(40)))

    answers = asyncio.run(burst())
    codes = {r.status_code for r in answers}
    assert codes <= {200, 429} and 429 in codes and 200 in codes, codes
    busy = next(r for r in answers if r.status_code == 429)
    assert busy.headers["retry-after"] and assert_openai_error(busy)["type"] == "rate_limit_error"


# ---- a Generator replica killed mid-stream ----------------------------------------------------


def generator_replica() -> str:
    from ray import serve

    return serve.get_deployment_handle("Generator", app_name=APP).stats.remote().result()["replica"]


def test_a_killed_generator_fails_its_streams_and_keeps_runtime_state(base_url, tmp):
    import ray

    post = lambda route, **kw: httpx.post(f"{base_url}{route}", timeout=120, **kw)  # noqa: E731
    r = post("/v1/load_lora_adapter", headers=AS_ADMIN, json={
        "lora_name": "qa_rt", "lora_path": "qa_copy", "description": "Answer questions about a "
        "passage.", "examples": QA_EXAMPLES})
    assert r.status_code == 200, r.text
    recorded = json.loads((tmp / "state" / "adapters.json").read_text())["adapters"]
    assert [a["name"] for a in recorded] == ["qa_rt"] and recorded[0]["examples"] == QA_EXAMPLES
    question = "Ana has the green hat. Tom is in the park. Question: who has the green hat?"
    routed = post("/v1/chat/completions", headers=AS_USER, json=chat_body(question, model="tandem:auto"))
    assert routed.json()["tandem"]["adapter"] == "qa_rt", routed.text  # the Router learnt it
    r = post("/v1/steering/vectors", headers=AS_ADMIN,
             files={"file": ("calm.gguf", tiny_vector("calm", tmp / "calm.gguf"))})
    assert r.status_code == 200, r.text

    victim = generator_replica()
    events, killed_at, error_at = [], 0.0, None
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", headers=AS_USER, timeout=30,
                      json=chat_body(max_tokens=300, stream=True)) as s:
        for line in s.iter_lines():
            if not line.startswith("data: "):
                continue
            events.append(line[6:])
            if len(events) == 3:  # mid-stream
                ray.kill(ray.get_actor(f"SERVE_REPLICA::{APP}#Generator#{victim}",
                                       namespace="serve"), no_restart=True)
                killed_at = time.monotonic()
            if error_at is None and '"error"' in events[-1]:
                error_at = time.monotonic()
    assert error_at is not None and error_at - killed_at < 2.0, events[-3:]
    assert_openai_error(json.loads(events[-2]))
    assert events[-1] == "[DONE]"
    print(f"error event {error_at - killed_at:.2f} s after the kill")

    deadline, answers = time.monotonic() + 60, []
    while time.monotonic() < deadline:  # until Serve has replaced the replica
        answers.append(post("/v1/chat/completions", headers=AS_USER, json=chat_body(max_tokens=2)))
        if answers[-1].status_code == 200:
            break
        # no replica yet: the request waits for one, up to its time limit
        assert answers[-1].status_code in (503, 504) and assert_openai_error(answers[-1])
        time.sleep(0.5)
    assert answers[-1].status_code == 200, answers[-1].text
    print(f"{len(answers)} request(s) until one succeeded, {time.monotonic() - killed_at:.1f} s "
          "after the kill")
    assert generator_replica() != victim
    r = post("/v1/chat/completions", headers=AS_USER, json=chat_body(
        model="tandem:qa_rt", max_tokens=2, steering={"vectors": [{"name": "calm", "coeff": 1.0}]}))
    assert r.status_code == 200, r.text  # the new replica loaded both at start
    # a new Router replica trains on the recorded adapter's examples at start
    router = next(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["name"].startswith(f"SERVE_REPLICA::{APP}#Router#"))
    ray.kill(ray.get_actor(router, namespace="serve"), no_restart=True)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        routed = post("/v1/chat/completions", headers=AS_USER,
                      json=chat_body(question, model="tandem:auto"))
        if routed.status_code == 200:
            break
        assert routed.status_code in (503, 504) and assert_openai_error(routed)
        time.sleep(0.5)
    assert routed.json()["tandem"]["adapter"] == "qa_rt", routed.text
    assert httpx.delete(f"{base_url}/v1/steering/vectors/calm", headers=AS_ADMIN).json()["deleted"]
    r = post("/v1/chat/completions", headers=AS_USER, json=chat_body(
        max_tokens=2, steering={"vectors": [{"name": "calm", "coeff": 1.0}]}))
    assert assert_openai_error(r, 404)["code"] == "vector_not_found"


# ---- fuzz: every route, generated from the app's OpenAPI schema ------------------------------

FUZZ_REQUESTS = 1100


def test_fuzz_every_route_from_the_schema(base_url):
    """Positive and negative cases of every operation in /openapi.json (schemathesis): no
    answer is a 5xx, every error is OpenAI's JSON, and the app serves normally after."""
    from collections import Counter

    import requests
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_dict(
        httpx.get(f"{base_url}/openapi.json", headers=AS_ADMIN).json())
    operations = {(m.upper(), p) for p, item in schema.raw_schema["paths"].items() for m in item}
    strategy = st.one_of(schema.as_strategy(GenerationMode.POSITIVE),
                         schema.as_strategy(GenerationMode.NEGATIVE))
    sent, statuses, failures, session = Counter(), Counter(), [], requests.Session()

    @settings(max_examples=FUZZ_REQUESTS, deadline=None, derandomize=True, database=None,
              phases=[Phase.generate], suppress_health_check=list(HealthCheck))
    @given(strategy)
    def fuzz(case):
        if isinstance(case.body, dict):  # long generations would only test the timeout
            for key, most in (("max_tokens", 16), ("max_completion_tokens", 16),
                              ("max_output_tokens", 16), ("n", 2)):
                if isinstance(case.body.get(key), int) and case.body[key] > most:
                    case.body[key] = most
            # half the generation requests name the served model, so they get past its lookup
            if isinstance(case.body.get("model"), str) and zlib.crc32(repr(case.body).encode()) % 2:
                case.body["model"] = "tandem"
                if isinstance(case.body.get("messages"), list):  # and past the messages' checks
                    case.body["messages"] = [{"role": "user", "content": "hi"}]
        try:
            r = case.call(base_url=base_url, session=session, headers=AS_ADMIN, timeout=30)
        except (requests.exceptions.InvalidHeader, ValueError, UnicodeError):
            return  # the client library refused to send it
        sent[(case.method.upper(), case.path)] += 1
        statuses[(case.method.upper(), case.path, r.status_code)] += 1
        if r.status_code >= 500:
            failures.append((case.method, case.path, case.body, r.status_code, r.content[:300]))
        elif r.status_code >= 400:
            try:
                assert_openai_error(json.loads(r.content))
            except (AssertionError, ValueError):
                failures.append((case.method, case.path, case.body, r.status_code, r.content[:300]))

    started = time.monotonic()
    fuzz()
    print(f"{sum(sent.values())} requests over {len(sent)} operations in "
          f"{time.monotonic() - started:.1f} s")
    print("statuses:", dict(Counter(code for *_, code in statuses.elements())))
    assert not failures, failures[:5]
    answered = {(m, p) for m, p, code in statuses if code < 300}
    assert {("POST", "/v1/chat/completions"), ("POST", "/v1/completions"),  # cases that
            ("POST", "/v1/vector_stores")} <= answered  # reach the work
    assert sum(sent.values()) >= 1000 and set(sent) == operations, operations - set(sent)
    r = httpx.post(f"{base_url}/v1/chat/completions", json=chat_body(max_tokens=4),
                   headers=AS_USER, timeout=30)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]
