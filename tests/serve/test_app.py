"""End to end: the real Ray Serve app built from serve_config.yaml's args with the real tiny
model, driven by the official `openai` client over HTTP: what needs the model's behaviour
(adapters, routing, RAG, steering, logprobs, persistence). The plumbing (routes, errors,
streaming, batching) is tested on the fake engine in test_plumbing.py."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

from tests.conftest import default_app_args
from tests.openai_scenarios import structured_output_and_a_forced_tool_call
from tests.serve.telemetry_checks import (  # noqa: F401 - run here, on this module's app, first
    telemetry_args,
    test_every_family_is_scraped_with_counts,
    test_grafana_queries_name_scraped_metrics,
    test_replica_logs_are_json_lines_with_the_request_id,
    test_request_id_in_header_and_body,
    test_trace_lists_the_interventions_step_by_step,
    trace_dir,
    traffic,
)

pytestmark = pytest.mark.serve

MODEL = "tandem"
APP_ARGS: dict = {}  # the args the module's app was built with (a restart reuses them)


@pytest.fixture(scope="module")
def adapter_root(tmp_path_factory):
    """A directory the app may load adapters from, holding a copy of the built-in qa adapter."""
    import shutil

    from models.builtin import resolve_source

    root = tmp_path_factory.mktemp("adapters")
    source = default_app_args()["model"]["source"]
    shutil.copytree(resolve_source(source).adapters["qa"], root / "qa_copy")
    return root


@pytest.fixture(scope="module")
def base_url(serve_url, tmp_path_factory, adapter_root, trace_dir):  # noqa: F811 (a fixture)
    from ray import serve

    from deployments.app import build_app

    args = default_app_args()
    args.setdefault("retrieval", {})["data_dir"] = str(tmp_path_factory.mktemp("retrieval"))
    args.setdefault("steering", {})["vector_dir"] = str(tmp_path_factory.mktemp("vectors"))
    args.setdefault("router", {})["adapter_roots"] = [str(adapter_root)]
    args.setdefault("server", {})["state_dir"] = str(tmp_path_factory.mktemp("state"))
    args.setdefault("engine", {})["speculative"] = {"drafter": "small_model"}  # requests opt in
    APP_ARGS.update(telemetry_args(args, trace_dir))
    started = time.monotonic()
    # as serve_config.yaml's logging_config: replica logs as JSON lines
    serve.run(build_app(args), name="tandem", route_prefix="/", logging_config={"encoding": "JSON"})
    print(f"app ready in {time.monotonic() - started:.1f} s")
    yield serve_url
    serve.delete("tandem")


@pytest.fixture(scope="module")
def client(base_url):
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def aclient(base_url):
    return openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=120)


def generator_stats() -> dict:
    from ray import serve

    return serve.get_deployment_handle("Generator", app_name="tandem").stats.remote().result()


def chat(client, content="Tell me about Mia.", **kw):
    return client.chat.completions.create(
        model=kw.pop("model", MODEL), messages=[{"role": "user", "content": content}], **kw
    )


def test_health_and_models(base_url, client):
    assert httpx.get(f"{base_url}/healthz").json()["status"] == "ok"
    ids = [m.id for m in client.models.list().data]
    assert ids[0] == MODEL and f"{MODEL}:auto" in ids


def test_logprobs(client):
    r = chat(client, temperature=0, max_tokens=4, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for item in content:
        assert item.logprob <= 0 and len(item.top_logprobs) == 3
        assert item.logprob == pytest.approx(max(t.logprob for t in item.top_logprobs), abs=1e-4)


def test_models_list_the_configured_adapters(client):
    ids = {m.id for m in client.models.list().data}
    assert {f"{MODEL}:rewrite", f"{MODEL}:qa", f"{MODEL}:list"} <= ids


def test_auto_picks_the_adapter_for_the_task(client):
    r = chat(client, "Rewrite in a positive tone: the old dog is sad near the lake.",
             model=f"{MODEL}:auto", max_tokens=4)
    tandem = r.model_extra["tandem"]
    assert tandem["adapter"] == "rewrite" and tandem["router"]["confidence"] >= 0.5
    r = chat(client, "How are you doing today, friend?", model=f"{MODEL}:auto", max_tokens=4)
    assert r.model_extra["tandem"]["adapter"] is None


def test_adapter_changes_greedy_output(client):
    prompt = "Mia has the red ball. Question: who has the red ball?"
    base = chat(client, prompt, temperature=0, max_tokens=8, extra_body={"ignore_eos": True})
    qa = chat(client, prompt, model=f"{MODEL}:qa", temperature=0, max_tokens=8,
              extra_body={"ignore_eos": True})
    assert qa.model_extra["tandem"]["adapter"] == "qa"
    assert qa.choices[0].message.content != base.choices[0].message.content


def test_load_and_unload_lora_adapter(base_url, client, adapter_root):
    r = httpx.post(f"{base_url}/v1/load_lora_adapter",
                   json={"lora_name": "qa2", "lora_path": "qa_copy"}, timeout=60)
    assert r.status_code == 200, r.text
    assert f"{MODEL}:qa2" in {m.id for m in client.models.list().data}
    prompt = "Mia has the red ball. Question: who has the red ball?"
    a = chat(client, prompt, model=f"{MODEL}:qa", temperature=0, max_tokens=6)
    b = chat(client, prompt, model=f"{MODEL}:qa2", temperature=0, max_tokens=6)
    assert a.choices[0].message.content == b.choices[0].message.content
    escape = httpx.post(f"{base_url}/v1/load_lora_adapter",
                        json={"lora_name": "evil", "lora_path": "../../etc"}, timeout=60)
    assert escape.status_code in (400, 403, 404) and "error" in escape.json()
    missing = httpx.post(f"{base_url}/v1/load_lora_adapter",
                         json={"lora_name": "gone", "lora_path": "nothing_here"}, timeout=60)
    assert missing.status_code == 404
    r = httpx.post(f"{base_url}/v1/unload_lora_adapter", json={"lora_name": "qa2"}, timeout=60)
    assert r.status_code == 200, r.text
    time.sleep(1.1)  # the Ingress caches the adapter list for a second
    with pytest.raises(openai.NotFoundError):
        chat(client, prompt, model=f"{MODEL}:qa2", max_tokens=2)
    assert chat(client, prompt, model=f"{MODEL}:qa", max_tokens=2).choices  # others still serve


# ---- retrieval ------------------------------------------------------------------------------


def test_rag_answers_cite_uploaded_documents(client, tmp_path):
    doc = tmp_path / "harbour.txt"
    doc.write_text("The lighthouse keeper Orla paints the harbour boats blue every spring.")
    f = client.files.create(file=doc.open("rb"), purpose="assistants")
    store = client.vector_stores.create(name="harbour", file_ids=[f.id])
    hits = client.vector_stores.search(store.id, query="Who paints the boats?")
    assert hits.data and hits.data[0].file_id == f.id
    r = chat(client, "Who paints the harbour boats?", max_tokens=4,
             extra_body={"rag": {"vector_store_ids": [store.id], "top_k": 2}})
    sources = r.model_extra["tandem"]["sources"]
    assert sources and sources[0]["filename"] == "harbour.txt" and "Orla" in sources[0]["text"]
    assert r.usage.prompt_tokens > chat(client, "Who paints the harbour boats?", max_tokens=1).usage.prompt_tokens
    assert "world" in {s.id for s in client.vector_stores.list().data}


def test_embeddings_route(client):
    r = client.embeddings.create(model="all-MiniLM-L6-v2", input=["a red kite", "a blue kite"])
    assert len(r.data) == 2 and len(r.data[0].embedding) == 384
    assert r.usage.prompt_tokens == r.usage.total_tokens == 10  # [CLS] a red kite [SEP], twice
    short = client.embeddings.create(model="all-MiniLM-L6-v2", input="a red kite", dimensions=64)
    assert len(short.data[0].embedding) == 64
    assert sum(x * x for x in short.data[0].embedding) == pytest.approx(1.0, abs=1e-4)


# ---- steering --------------------------------------------------------------------------------


def test_steering_vectors_list_extract_upload(base_url, tmp_path):
    listed = httpx.get(f"{base_url}/v1/steering/vectors").json()
    assert listed["object"] == "list" and "positive" in {v["id"] for v in listed["data"]}
    r = httpx.post(f"{base_url}/v1/steering/vectors/extract", timeout=120, json={
        "name": "cheer", "positive": ["Mia is happy.", "The park is lovely."],
        "negative": ["Mia is sad.", "The park is awful."], "method": "pca"})
    assert r.status_code == 200, r.text
    assert r.json()["name"] == "cheer"
    import torch

    from models.steering.vectors import SteeringVector, save_gguf

    shape = next(v for v in listed["data"] if v["id"] == "positive")
    good = tmp_path / "calm.gguf"
    save_gguf(SteeringVector("calm", {1: torch.randn(shape["hidden_size"])}), good)
    r = httpx.post(f"{base_url}/v1/steering/vectors", files={"file": ("calm.gguf", good.read_bytes())})
    assert r.status_code == 200, r.text
    bad = tmp_path / "wide.gguf"
    save_gguf(SteeringVector("wide", {1: torch.randn(shape["hidden_size"] + 3)}), bad)
    r = httpx.post(f"{base_url}/v1/steering/vectors", files={"file": ("wide.gguf", bad.read_bytes())})
    assert r.status_code == 400 and "hidden" in r.json()["error"]["message"]
    r = httpx.post(f"{base_url}/v1/steering/vectors", files={"file": ("x.txt", b"hello")})
    assert r.status_code == 415
    names = {v["id"] for v in httpx.get(f"{base_url}/v1/steering/vectors").json()["data"]}
    assert {"positive", "cheer", "calm"} <= names


def test_static_vector_changes_output(client):
    plain = chat(client, temperature=0, max_tokens=10, extra_body={"ignore_eos": True})
    steered = chat(client, temperature=0, max_tokens=10, extra_body={
        "ignore_eos": True, "steering": {"vectors": [{"name": "positive", "coeff": 12.0}]}})
    assert steered.choices[0].message.content != plain.choices[0].message.content


@pytest.mark.parametrize("mode", ["sync", "colocated", "async"])
def test_policies_run_in_every_mode(client, mode):
    before = generator_stats()["observer_calls"]
    r = chat(client, temperature=0, max_tokens=8, extra_body={
        "ignore_eos": True, "steering": {"policy": "proxy", "mode": mode}})
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 8
    calls = generator_stats()["observer_calls"] - before
    assert 1 <= calls <= 8 + 1  # one call per engine step, not per token per request
    if mode != "async":
        kinds = {i["action"] for i in r.model_extra["tandem"]["interventions"]}
        assert "AdjustedLogits" in kinds


def test_probe_scores_sae_features_and_sae_vectors_through_serve(base_url, client):
    gloomy = "Continue the story: Omar feels gloomy. The park is awful. Ben is sad."
    r = chat(client, gloomy, temperature=0, max_tokens=6, extra_body={"ignore_eos": True,
             "tandem": {"activations": {"probes": ["gloom_probe"], "features": 2}}})  # fmt: skip
    (acts,) = r.model_extra["tandem"]["activations"]
    assert len(acts["probes"]["gloom_probe"]) == 6 and len(acts["features"]) == 6
    assert all(0 <= p <= 1 for p in acts["probes"]["gloom_probe"])
    bad = httpx.post(f"{base_url}/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": "Hi"}],
        "tandem": {"activations": {"probes": ["nope"]}}})  # fmt: skip
    assert bad.status_code == 400 and "gloom_probe" in bad.json()["error"]["message"]
    got = httpx.post(f"{base_url}/v1/features/extract", timeout=60,
                     json={"input": ["Tom has the red ball. Ben is sad."], "top_k": 3}).json()
    ben = next(t for t in got["data"][0]["tokens"] if t["token"] == " Ben")
    assert "person" in {f["name"] for f in ben["features"]}
    too_many = httpx.post(f"{base_url}/v1/features/extract", json={"input": ["a"] * 17})
    assert too_many.status_code == 400
    plain = chat(client, temperature=0, max_tokens=10, extra_body={"ignore_eos": True})
    for name in ("sae:sunny", f"sae:{ben['features'][0]['index']}"):
        steered = chat(client, temperature=0, max_tokens=10, extra_body={
            "ignore_eos": True, "steering": {"vectors": [{"name": name, "coeff": 8.0}]}})
        assert steered.choices[0].message.content != plain.choices[0].message.content, name


def test_sync_proxy_tuning_differs_from_plain(client):
    plain = chat(client, temperature=0, max_tokens=10, extra_body={"ignore_eos": True})
    proxied = chat(client, temperature=0, max_tokens=10, extra_body={
        "ignore_eos": True, "steering": {"policy": "proxy", "mode": "sync", "params": {"alpha": 4.0}}})
    assert proxied.choices[0].message.content != plain.choices[0].message.content


# ---- blast radius ----------------------------------------------------------------------------


def poisoned_uploads(base_url: str, adapter_root, tmp_path) -> list[tuple[str, dict]]:
    """(route, httpx.post kwargs) for a NaN LoRA adapter and NaN / huge steering vectors."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from models.steering.vectors import SteeringVector, save_gguf

    nan_lora = adapter_root / "qa_nan"
    if not nan_lora.exists():
        shutil.copytree(adapter_root / "qa_copy", nan_lora)
        weights = nan_lora / "adapter_model.safetensors"
        tensors = load_file(str(weights))
        tensors[next(k for k in tensors if ".lora_B." in k)][0, 0] = float("nan")
        save_file(tensors, str(weights))
    hidden = next(v["hidden_size"] for v in httpx.get(f"{base_url}/v1/steering/vectors")
                  .json()["data"] if v["id"] == "positive")  # fmt: skip
    uploads = []
    for name, value in (("nan_vector", float("nan")), ("huge_vector", 1e38)):
        vector = SteeringVector(name, {1: torch.ones(hidden)})
        vector.directions[1][0] = value  # past the constructor's check, as a hostile file is
        save_gguf(vector, tmp_path / f"{name}.gguf")
        uploads.append(("/v1/steering/vectors",
                        {"files": {"file": (f"{name}.gguf", (tmp_path / f"{name}.gguf").read_bytes())}}))
    return [("/v1/load_lora_adapter", {"json": {"lora_name": "nan", "lora_path": "qa_nan"}}),
            *uploads]


def test_bad_requests_do_not_touch_four_running_streams(base_url, client, adapter_root, tmp_path):
    """Every bad field of issue 19, sent while four greedy streams run: each bad request gets
    its 4xx at once, the four streams finish whole (all their tokens, [DONE], no error
    event) with the text they have alone, and the next request answers 200 at once."""
    import asyncio
    import json

    content = "Continue the story: Omar feels gloomy. The park is awful."
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}],
            "max_tokens": 48, "temperature": 0, "ignore_eos": True}
    alone = chat(client, content, max_tokens=48, temperature=0,
                 extra_body={"ignore_eos": True}).choices[0].message.content

    def bad(**fields):
        return {**body, "max_tokens": 4, **fields}

    guard = {"policy": "guard", "mode": "sync"}
    bad_requests = [
        ("/v1/chat/completions", {"json": bad(seed=2**64)}, 400, "seed"),
        ("/v1/chat/completions", {"json": bad(seed=-(2**63) - 1)}, 400, "seed"),
        ("/v1/chat/completions", {"json": bad(top_k=2**63)}, 400, "top_k"),
        ("/v1/chat/completions", {"json": bad(logit_bias={"999999": 5})}, 400, "logit_bias"),
        ("/v1/chat/completions", {"json": bad(logit_bias={"5": 1e9})}, 400, "logit_bias"),
        ("/v1/completions", {"json": {"model": MODEL, "prompt": [-1], "max_tokens": 2}}, 400,
         "prompt"),
        ("/v1/completions", {"json": {"model": MODEL, "prompt": [10**9], "max_tokens": 2}}, 400,
         "prompt"),
        ("/v1/chat/completions", {"json": bad(steering={**guard, "params": {"threshold": "x"}})},
         400, "steering.params.threshold"),
        ("/v1/chat/completions", {"json": bad(steering={**guard, "params": {"window": 0}})},
         400, "steering.params.window"),
        ("/v1/chat/completions", {"json": bad(steering={**guard, "params": {"nope": 1}})},
         400, "steering.params.nope"),
        ("/v1/chat/completions", {"json": bad(steering={**guard, "params": {"coeff": 1e30}})},
         400, "steering.params.coeff"),
        ("/v1/chat/completions", {"json": bad(steering={"policy": "proxy",
                                                        "params": {"expert": "nope"}})},
         400, "steering.params.expert"),
        ("/v1/chat/completions", {"json": bad(steering={"policy": "contrastive",
                                                        "params": {"beta": -1e30}})},
         400, "steering.params.beta"),
        ("/v1/chat/completions", {"json": bad(steering={"vectors": [{"name": "positive",
                                                                     "coeff": 1e30}]})},
         400, "steering.vectors.0.coeff"),
        *[(route, kw, 400, None) for route, kw in poisoned_uploads(base_url, adapter_root,
                                                                      tmp_path)],
    ]

    async def stream(http) -> tuple[str, list[str]]:
        text, lines = "", []
        async with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    lines.append(line)
                    if line.startswith("data: {"):
                        for choice in json.loads(line[6:]).get("choices", []):
                            text += choice["delta"].get("content") or ""
        return text, lines

    async def storm(http) -> list:
        await asyncio.sleep(0.3)  # the streams are running
        answers = []
        for route, kw, *_ in bad_requests:
            started = time.monotonic()
            r = await http.post(route, **kw)
            answers.append((r, time.monotonic() - started))
        return answers

    async def main():
        async with httpx.AsyncClient(base_url=base_url, timeout=120) as http:
            return await asyncio.gather(*(stream(http) for _ in range(4)), storm(http))

    *streams, answers = asyncio.run(main())
    for (route, kw, status, param), (r, took) in zip(bad_requests, answers, strict=True):
        err = r.json()["error"]
        assert r.status_code == status, (route, kw.get("json"), r.text)
        assert err["type"] == "invalid_request_error" and err["message"], r.text
        if param:
            assert err["param"] == param, r.text
        assert took < 30, (route, took)  # answered, not queued behind the streams
    for text, lines in streams:
        assert lines[-1] == "data: [DONE]" and not any('"error"' in line for line in lines)
        assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] == "length"
        assert text == alone
    started = time.monotonic()
    after = chat(client, content, max_tokens=4, temperature=0)
    assert after.choices[0].finish_reason == "length" and time.monotonic() - started < 10
    names = {v["id"] for v in httpx.get(f"{base_url}/v1/steering/vectors").json()["data"]}
    assert not names & {"nan_vector", "huge_vector"}
    assert f"{MODEL}:nan" not in {m.id for m in client.models.list().data}


# ---- restart (keep last: it redeploys the app) -----------------------------------------------


def test_uploads_survive_an_app_restart(base_url, client, tmp_path):
    from ray import serve

    from deployments.app import build_app

    doc = tmp_path / "orchard.md"
    doc.write_text("# Orchard\n\nThe orchard keeper Tomas stores the pears in the cold cellar.")
    f = client.files.create(file=doc.open("rb"), purpose="assistants")
    store = client.vector_stores.create(name="orchard", file_ids=[f.id])
    before = client.vector_stores.search(store.id, query="Where are the pears kept?")
    assert before.data and "cellar" in before.data[0].content[0].text

    serve.delete("tandem")
    serve.run(build_app(APP_ARGS), name="tandem", route_prefix="/")

    assert store.id in {s.id for s in client.vector_stores.list().data}
    assert f.id in {x.id for x in client.files.list().data}
    after = client.vector_stores.search(store.id, query="Where are the pears kept?")
    assert [(h.file_id, h.score) for h in after.data] == [(h.file_id, h.score) for h in before.data]
    assert client.files.content(f.id).read() == doc.read_bytes()


def test_structured_output_and_tool_calls_through_serve(base_url, client):
    messages = structured_output_and_a_forced_tool_call(client, MODEL)
    assert client.models.retrieve(f"{MODEL}:auto").id == f"{MODEL}:auto"
    ids = httpx.post(f"{base_url}/tokenize", json={"model": MODEL, "prompt": "Mia"}).json()["tokens"]
    back = httpx.post(f"{base_url}/detokenize", json={"model": MODEL, "tokens": ids}).json()
    assert back["prompt"] == "Mia"
    with pytest.raises(openai.BadRequestError, match="reasoning_effort"):
        client.chat.completions.create(model=MODEL, messages=messages, reasoning_effort="low")


def test_responses_api_through_serve(client, tmp_path):
    """client.responses: plain, streamed, a function tool and its result, file_search citing an
    uploaded file (attached with a file batch); store: true is a 400 naming it."""
    plain = client.responses.create(model=MODEL, input="Where is Ivy?", temperature=0,
                                    instructions="Answer briefly.", max_output_tokens=32)
    assert plain.status == "completed" and plain.output_text.strip()
    assert plain.usage.input_tokens > 0 and plain.usage.output_tokens > 0
    with client.responses.stream(model=MODEL, input="Where is Ivy?", temperature=0,
                                 instructions="Answer briefly.", max_output_tokens=32) as stream:
        deltas = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
        final = stream.get_final_response()
    assert deltas == final.output_text == plain.output_text
    tool = {"type": "function", "name": "find_person", "strict": True, "parameters": {
        "type": "object", "properties": {"who": {"enum": ["Mia", "Tom"]}}, "required": ["who"],
        "additionalProperties": False}}
    called = client.responses.create(model=MODEL, input="Where is Mia?", tools=[tool],
                                     tool_choice="required", parallel_tool_calls=False,
                                     max_output_tokens=96)  # one call: a second could be cut
    call = called.output[0]
    assert call.type == "function_call" and json.loads(call.arguments)["who"] in ("Mia", "Tom")
    history = [{"role": "user", "content": "Where is Mia?"}, call,
               {"type": "function_call_output", "call_id": call.call_id, "output": "the bakery"}]
    answered = client.responses.create(model=MODEL, input=history, tools=[tool],
                                       max_output_tokens=8)
    assert answered.usage.input_tokens > called.usage.input_tokens  # the call and its result
    ids = []
    for name, text in (("mia.txt", "Mia is in the bakery. Mia has the red ball."),
                       ("tom.txt", "Tom is in the garden. Tom feels happy.")):
        (tmp_path / name).write_text(text)
        ids.append(client.files.create(file=(tmp_path / name).open("rb"), purpose="assistants").id)
    store = client.vector_stores.create(name="people")
    batch = client.vector_stores.file_batches.create_and_poll(vector_store_id=store.id,
                                                              file_ids=ids)  # fmt: skip
    assert batch.status == "completed" and batch.file_counts.completed == 2
    f = client.files.retrieve(ids[0])
    found = client.responses.create(model=MODEL, input="Where is Mia?", temperature=0,
                                    max_output_tokens=32, include=["file_search_call.results"],
                                    tools=[{"type": "file_search", "vector_store_ids": [store.id]}])
    search, message = found.output
    assert search.type == "file_search_call" and search.results[0].file_id == f.id
    assert "bakery" in found.output_text
    cited = message.content[0].annotations
    assert cited and cited[0].file_id == f.id and cited[0].filename == "mia.txt"
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(model=MODEL, input="hi", store=True)
    assert err.value.body["param"] == "store"


def test_rag_filters_reach_the_retriever(client):
    def sources(rag: dict) -> list:
        r = client.chat.completions.create(model=MODEL, max_tokens=4, extra_body={"rag": rag},
                                           messages=[{"role": "user", "content": "Where is Ivy?"}])
        return r.model_extra["tandem"]["sources"]

    assert sources({"vector_store_ids": ["world"]})
    assert sources({"vector_store_ids": ["world"],
                    "filters": {"type": "eq", "key": "team", "value": "none"}}) == []


def test_speculative_decoding_through_serve(client):
    """The small model drafts inside the Generator replica: greedy text identical with and
    without, streamed several tokens per step; a bad k is a 400 naming the field (the
    schema's bound in the Ingress, the engine's max_k in the Generator)."""
    plain = chat(client, temperature=0, max_tokens=12, extra_body={"ignore_eos": True})
    ask = {"ignore_eos": True, "tandem": {"speculative": {"k": 4}}}
    chunks = list(chat(client, temperature=0, max_tokens=12, stream=True, extra_body=ask))
    contents = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(contents) == plain.choices[0].message.content
    report = chunks[-1].model_extra["tandem"]["speculative"]
    assert report["k"] == 4 and report["proposed"] > 0
    assert len(contents) <= 12 - report["accepted"]  # a step's kept drafts travel together
    for k, param in ((99, "tandem.speculative.k"), (12, "tandem.speculative.k")):
        with pytest.raises(openai.BadRequestError, match=param.replace(".", r"\.")):
            chat(client, max_tokens=4, extra_body={"tandem": {"speculative": {"k": k}}})


def test_api_keys_are_enforced_when_configured(base_url):
    """Redeploys the app with an API key (keep it the last test of this file: it changes the
    app for every test after it)."""
    from ray import serve

    from deployments.app import build_app

    args = {**APP_ARGS, "server": {**APP_ARGS.get("server", {}), "api_keys": ["sk-test"]}}
    serve.delete("tandem")
    serve.run(build_app(args), name="tandem", route_prefix="/")
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    missing = httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=60)
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "invalid_api_key"
    wrong = openai.OpenAI(base_url=f"{base_url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    with pytest.raises(openai.AuthenticationError):
        wrong.vector_stores.list()
    ok = openai.OpenAI(base_url=f"{base_url}/v1", api_key="sk-test", max_retries=0)
    assert ok.chat.completions.create(**body).choices
