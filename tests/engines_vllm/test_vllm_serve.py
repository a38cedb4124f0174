"""End to end with `engine.kind: vllm`: the real Ray Serve app from serve_config.yaml's args on the
built-in toy model, vLLM's CPU build in the Generator replica, the official `openai` client over
HTTP. Greedy tokens equal the torch engine's, `auto` picks an adapter that vLLM applies (its task
checker passes), streaming and a client that goes away, proxy tuning through vLLM's logits
processor equal to the torch engine's, response_format and a forced tool call through vLLM's
guided decoding, n > 1 with a seed, a steering vector through the hooks in vLLM's workers, and
what vLLM cannot do answered with a 400."""

from __future__ import annotations

import json
import random
import time

import httpx
import openai
import pytest

pytest.importorskip("vllm.engine")  # a real vLLM (not a folder named vllm)

from models.builtin import resolve_source, world  # noqa: E402
from models.builtin.validate import check_task  # noqa: E402
from models.engine.config import EngineConfig  # noqa: E402
from models.engine.llm_engine import LLMEngine  # noqa: E402
from models.protocol.requests import GenerationRequest, SamplingParams  # noqa: E402
from models.protocol.steering import SteeringRequest  # noqa: E402
from models.steering.config import SteeringConfig  # noqa: E402
from models.steering.runtime import SteeringRuntime  # noqa: E402
from tests.conftest import default_app_args  # noqa: E402
from tests.openai_scenarios import structured_output_and_a_forced_tool_call  # noqa: E402
from tests.serve.conftest import deploy, serve_url  # noqa: E402, F401

pytestmark = pytest.mark.serve
MODEL = "tandem"
TEXTS = ["Anna has a red ball.", "The blue map is", "Omar feels"]


@pytest.fixture(scope="module")
def args():
    args = default_app_args()
    args["engine"] = {"kind": "vllm", "kv_cache_cpu_gib": 0.25}
    args["retrieval"] = {"enabled": False}
    return args


@pytest.fixture(scope="module")
def base_url(serve_url, args, tmp_path_factory):  # noqa: F811
    from ray import serve

    from deployments.app import build_app

    args.setdefault("steering", {})["vector_dir"] = str(tmp_path_factory.mktemp("vectors"))
    started = time.monotonic()
    deploy(build_app(args), "tandem-vllm", "/")
    print(f"app with the vllm engine ready in {time.monotonic() - started:.1f} s")
    yield serve_url
    serve.delete("tandem-vllm")


@pytest.fixture(scope="module")
def client(base_url):
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def torch_engine(args):
    paths = resolve_source(args["model"]["source"])
    engine = LLMEngine(EngineConfig(num_kv_blocks=256), paths.big)
    runtime = SteeringRuntime.from_source(SteeringConfig.model_validate(args["steering"]),
                                          args["model"]["source"])  # fmt: skip
    engine.set_step_observer(runtime)
    return engine


def torch_greedy(engine: LLMEngine, prompt: list[int], n: int, steering=None) -> list[int]:
    params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
    engine.add_request(GenerationRequest(f"t{random.random()}", prompt, params, steering=steering))
    tokens = []
    while engine.has_unfinished():
        tokens += [t for out in engine.step() for t in out.token_ids]
    return tokens


def test_greedy_text_equals_the_torch_engine(client, torch_engine):
    tok = torch_engine.tokenizer
    for text in TEXTS:
        prompt = tok.encode(text, add_special_tokens=False)
        want = tok.decode(torch_greedy(torch_engine, prompt, 12), skip_special_tokens=True)
        r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0,
                                      extra_body={"ignore_eos": True})  # fmt: skip
        assert r.choices[0].text == want, text
        assert r.usage.completion_tokens == 12 and r.choices[0].finish_reason == "length"


def test_auto_picks_an_adapter_that_vllm_applies(client):
    rng = random.Random(3)
    passed = 0
    for _ in range(3):
        prompt, answer = world.sample_task_prompt("qa", rng)
        r = client.chat.completions.create(model=f"{MODEL}:auto", temperature=0, max_tokens=16,
                                           messages=[{"role": "user", "content": prompt}])
        assert r.model_extra["tandem"]["adapter"] == "qa"
        passed += check_task("qa", answer, r.choices[0].message.content)
    assert passed >= 2


def test_streaming_and_a_client_that_goes_away(client, base_url):
    from ray import serve

    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Tell me about Mia."}], stream=True,
        max_tokens=24, temperature=0, extra_body={"ignore_eos": True})  # fmt: skip
    chunks = [c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta.content]
    assert len(chunks) >= 2
    with httpx.stream("POST", f"{base_url}/v1/completions", timeout=60, json={
            "model": MODEL, "prompt": "Mia", "max_tokens": 900, "stream": True,
            "ignore_eos": True}) as r:  # fmt: skip
        for i, _ in enumerate(r.iter_lines()):
            if i > 4:
                break  # leaves: the Generator aborts the request in vLLM
    generator = serve.get_deployment_handle("Generator", app_name="tandem-vllm")
    deadline = time.monotonic() + 30
    while generator.stats.remote().result()["num_running"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert generator.stats.remote().result()["num_running"] == 0


def test_proxy_tuning_through_the_logits_processor_equals_the_torch_engine(client, torch_engine):
    tok = torch_engine.tokenizer
    prompt = tok.encode(TEXTS[0], add_special_tokens=False)
    steering = {"policy": "proxy", "mode": "sync", "params": {"alpha": 4.0}}
    want = torch_greedy(torch_engine, prompt, 10, SteeringRequest(**steering))
    got = client.completions.create(model=MODEL, prompt=prompt, max_tokens=10, temperature=0,
                                    extra_body={"ignore_eos": True, "steering": steering})
    assert got.choices[0].text == tok.decode(want, skip_special_tokens=True)
    plain = tok.decode(torch_greedy(torch_engine, prompt, 10), skip_special_tokens=True)
    assert got.choices[0].text != plain


def test_structured_output_and_a_forced_tool_call_through_vllm(client):
    messages = structured_output_and_a_forced_tool_call(client, MODEL)
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=32,
                                       response_format={"type": "json_object"})  # fmt: skip
    assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_n_choices_with_a_seed_are_reproducible(client):
    def texts():
        r = client.completions.create(model=MODEL, prompt="Mia", max_tokens=12, n=3, seed=5,
                                      temperature=1.0, extra_body={"ignore_eos": True})
        return [c.text for c in sorted(r.choices, key=lambda c: c.index)]

    first = texts()
    assert len(first) == 3 and len(set(first)) > 1 and texts() == first


def test_a_steering_vector_steers_through_the_hooks(base_url):
    def text(steering: dict | None) -> str:
        body = {"model": MODEL, "prompt": "Mia is", "max_tokens": 12, "temperature": 0,
                "ignore_eos": True, **({"steering": steering} if steering else {})}
        r = httpx.post(f"{base_url}/v1/completions", timeout=60, json=body)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    plain = text(None)
    steered = text({"vectors": [{"name": "positive", "coeff": 8.0}]})
    assert steered != plain and text(None) == plain


def test_what_vllm_cannot_do_is_a_400_naming_engine_and_capability(base_url):
    r = httpx.post(f"{base_url}/v1/completions", timeout=60, json={
        "model": MODEL, "prompt": "Mia", "max_tokens": 4, "steering": {"policy": "guard"}})
    error = r.json()["error"]
    assert r.status_code == 400 and "engine 'vllm'" in error["message"], r.text
    assert "token_events" in error["message"] and error["code"] == "unsupported_by_engine"
    r = httpx.post(f"{base_url}/v1/completions", timeout=60, json={
        "model": MODEL, "prompt": "Mia", "max_tokens": 4,
        "tandem": {"activations": {"layers": [1]}}})  # fmt: skip
    assert r.status_code == 400 and "hidden_state_capture" in r.json()["error"]["message"]
    r = httpx.post(f"{base_url}/v1/chat/completions", timeout=60, json={
        "model": MODEL, "messages": [{"role": "user", "content": "Mia"}], "response_format": {
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format", r.text
