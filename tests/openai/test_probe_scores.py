"""`tandem.activations.probes` and `.features` through the OpenAI serving layer in-process, over
the real torch engine on the trained toy model (no Ray): per-token probe scores of the
configured probe policies and SAE features, equal in the response and the stream, meaningful
(a gloom probe scores gloomy stories above sunny ones), and 400s for what cannot be served."""

from __future__ import annotations

import asyncio
import base64
import json
import random

import numpy as np
import pytest
import torch

from models.activations.reader import ActivationReader
from models.builtin import quality, resolve_source, world
from models.engine import build_engine
from models.engine.config import EngineConfig
from models.openai.errors import OpenAIError
from models.openai.serving import Backends, OpenAIServing, ServingLimits
from models.steering.config import SteeringConfig


def stories(seed: int, gloomy: bool, n: int) -> list[str]:
    rng = random.Random(seed)
    return [quality.chat_text("Continue the story: " + " ".join(
        world.story(rng, not gloomy, consistency=1.0, drift=False))) for _ in range(n)]  # fmt: skip


STEERING = {"sae": "builtin", "policies": [{"name": "gloom", "kind": "probe", "params": {
    "hidden_layers": [1], "action": "force", "force_text": "!",
    "positive": stories(11, True, 30), "negative": stories(12, False, 30)}}]}  # fmt: skip


@pytest.fixture(scope="module")
def setup():
    big = resolve_source("builtin:toy").big
    eng = build_engine(EngineConfig(kv_cache_cpu_gib=0.05), big)
    asyncio.run(eng.start())
    reader = ActivationReader.from_steering(SteeringConfig.model_validate(STEERING), big,
                                            eng.core.args.hidden_size, eng.core.args.num_layers)  # fmt: skip
    return eng, reader


def serving(setup) -> OpenAIServing:
    eng, reader = setup
    return OpenAIServing(
        model_name="tandem", tokenizer=eng.tokenizer, backends=Backends(generate=eng.generate),
        limits=ServingLimits(max_model_len=512, vocab_size=len(eng.tokenizer), max_n=4),
        activations=reader,
    )  # fmt: skip


def body(prompt: str, **kw) -> dict:
    return {"model": "tandem", "prompt": prompt, "max_tokens": 8, "temperature": 0,
            "ignore_eos": True, **kw}  # fmt: skip


async def streamed(s: OpenAIServing, b: dict) -> list[dict]:
    objs = []
    async for line in await s.completions({**b, "stream": True}):
        if line.startswith("data: {"):
            objs += json.loads(line[6:]).get("tandem", {}).get("activations", [])
    return objs


def test_probe_scores_come_per_token_in_response_and_stream(setup):
    ask = {"activations": {"probes": ["gloom"], "layers": [1], "features": 3}}
    prompt = stories(5, True, 1)[0]
    s = serving(setup)
    (acts,) = asyncio.run(s.completions(body(prompt, tandem=ask)))["tandem"]["activations"]
    scores = acts["probes"]["gloom"]
    assert len(scores) == 8 and all(0 <= x <= 1 for x in scores)
    # the score is the probe of the raw vector the same response carries
    probe = setup[1]._trained["gloom"].probe
    raw = [np.frombuffer(base64.b64decode(t), "<f2").reshape(acts["shape"]) for t in acts["tokens"]]
    again = probe.probability(torch.tensor(np.stack(raw)).float().reshape(8, -1)).tolist()
    np.testing.assert_allclose(scores, again, atol=1e-3)
    assert len(acts["features"]) == 8 and all(1 <= len(f) <= 3 for f in acts["features"])
    chunks = asyncio.run(streamed(s, body(prompt, tandem=ask)))
    np.testing.assert_allclose([x for c in chunks for x in c["probes"]["gloom"]], scores,
                               atol=1e-4)  # fmt: skip
    assert [f for c in chunks for f in c["features"]] == acts["features"]


def test_a_gloom_probe_scores_gloomy_stories_above_sunny_ones(setup):
    s = serving(setup)
    ask = {"activations": {"probes": ["gloom"]}}

    async def mean_score(gloomy: bool) -> float:
        outs = await asyncio.gather(*(s.completions(body(p, tandem=ask))
                                      for p in stories(7, gloomy, 6)))  # fmt: skip
        return float(np.mean([o["tandem"]["activations"][0]["probes"]["gloom"] for o in outs]))

    gloomy, sunny = asyncio.run(mean_score(True)), asyncio.run(mean_score(False))
    assert gloomy > 0.5 > sunny, (gloomy, sunny)


@pytest.mark.parametrize("ask, param", [
    ({"probes": ["nope"]}, "tandem.activations.probes"),
    ({"probes": ["gloom"], "features": 40}, None),  # features at most 32
    ({}, None),  # asks for nothing
    ({"probes": ["gloom"], "layers": [0, 2, 3]}, "tandem.activations"),  # 4 x 30 x 4 > 100
])  # fmt: skip
def test_bad_probe_requests_are_400s(setup, ask, param, monkeypatch):
    monkeypatch.setattr("models.openai.activations.MAX_ACTIVATION_VECTORS", 100)
    with pytest.raises(OpenAIError) as err:
        asyncio.run(serving(setup).completions(
            body("Mia is", n=4, max_tokens=30, tandem={"activations": ask})))
    assert err.value.status_code == 400
    if param:
        assert err.value.param == param


def test_without_a_reader_probes_and_features_are_400s(setup):
    s = serving(setup)
    s.activations = None
    for ask in ({"probes": ["gloom"]}, {"features": 2}):
        with pytest.raises(OpenAIError) as err:
            asyncio.run(s.completions(body("Mia is", tandem={"activations": ask})))
        assert err.value.status_code == 400 and err.value.param == "tandem.activations"


def test_a_stored_request_writes_the_rows_the_response_carries(setup, tmp_path):
    import duckdb

    from models.activations.store import ActivationStore, ActivationStoreConfig

    s = serving(setup)
    s.store = ActivationStore(ActivationStoreConfig(dir=str(tmp_path), max_files=2))
    ask = {"activations": {"probes": ["gloom"], "features": 2, "layers": [3], "store": True}}
    prompt = stories(5, True, 1)[0]
    first = asyncio.run(s.completions(body(prompt, n=2, tandem=ask)))
    (path,) = s.store.files()
    rows = duckdb.sql(f"SELECT * FROM read_parquet('{tmp_path}/*.parquet', union_by_name = true) "
                      "ORDER BY choice, position").fetchall()  # the README's query
    cols = duckdb.sql(f"SELECT * FROM '{path}'").columns
    table = [dict(zip(cols, r, strict=True)) for r in rows]
    assert len(table) == 16 and {r["request_id"] for r in table} == {first["tandem"]["request_id"]}
    for c, acts in enumerate(first["tandem"]["activations"]):
        mine = [r for r in table if r["choice"] == c]
        np.testing.assert_allclose([r["probe_gloom"] for r in mine], acts["probes"]["gloom"])
        assert [[f["index"] for f in r["features"]] for r in mine] == \
            [[f["index"] for f in fs] for fs in acts["features"]]
        raw = np.frombuffer(base64.b64decode(acts["tokens"][0]), "<f2").astype("float32")
        np.testing.assert_allclose(mine[0]["layer_3"], raw)
    ids = [r["token_id"] for r in table if r["choice"] == 0]
    assert setup[0].tokenizer.decode(ids, skip_special_tokens=True) == first["choices"][0]["text"]
    assert "".join(r["token"] for r in table if r["choice"] == 0) == setup[0].tokenizer.decode(ids)
    counts = duckdb.sql(f"""SELECT f.name, f.index, count(*) AS n, avg(f.activation) AS mean
        FROM (SELECT unnest(features) AS f FROM read_parquet('{tmp_path}/*.parquet',
                                                             union_by_name = true))
        GROUP BY ALL ORDER BY n DESC LIMIT 10""").fetchall()  # the README's second query
    assert sum(n for _, _, n, _ in counts) <= 32 and counts[0][2] >= 1
    # streamed requests are stored too; past max_files the oldest file goes
    asyncio.run(streamed(s, body(prompt, tandem=ask)))
    asyncio.run(s.completions(body(prompt, tandem=ask)))
    files = s.store.files()
    assert len(files) == 2 and path not in files
    plain = asyncio.run(s.completions(body(prompt, tandem={"activations": {"probes": ["gloom"]}})))
    assert "activations" in plain["tandem"] and s.store.files() == files  # not asked: not stored


def test_retention_by_bytes_deletes_the_oldest_files(tmp_path):
    from models.activations.store import ActivationStore, ActivationStoreConfig

    store = ActivationStore(ActivationStoreConfig(dir=str(tmp_path)))
    rows = [{"choice": 0, "position": i, "token_id": i, "token": "x", "probe_p": 0.5}
            for i in range(50)]  # fmt: skip
    paths = [store.write(f"r{i}", rows) for i in range(3)]
    store.max_bytes = paths[0].stat().st_size * 2 + 10
    store.write("r3", rows)
    assert [p.name for p in store.files()] == [paths[2].name, store.files()[-1].name]


def test_store_without_a_configured_store_is_a_400(setup):
    with pytest.raises(OpenAIError) as err:
        asyncio.run(serving(setup).completions(
            body("Mia is", tandem={"activations": {"probes": ["gloom"], "store": True}})))
    assert err.value.status_code == 400 and err.value.param == "tandem.activations.store"


def test_sae_vector_names_pass_the_edge_as_steering_vectors_only(setup):
    from models.steering.policies.admission import PolicyAdmission

    steering = SteeringConfig.model_validate({"policies": [
        {"name": "guard", "kind": "vector_guard", "params": {"vector": "positive"}}]})
    s = serving(setup)

    async def vectors():
        return ["positive", "sae:sunny"]  # what a Generator lists: the named features

    s.backends.vectors = vectors
    s.limits.policies = {p.name: dict(p.params) for p in steering.policies}
    s.limits.policy_admission = PolicyAdmission.from_config(steering, num_layers=6)
    index = f"sae:{setup[1].sae.names['gloomy']}"
    for steer, param in [({"policy": "guard", "params": {"vector": index}}, "steering.params.vector"),
                         ({"vectors": [{"name": "sae:9999", "coeff": 1.0}]}, "steering.vectors")]:
        with pytest.raises(OpenAIError) as err:  # an index in a policy; an index out of range
            asyncio.run(s.completions(body("Mia is", steering=steer)))
        assert (err.value.status_code, err.value.param) == (404, param), err.value.message
        assert "sae:sunny" in err.value.message
    # an index in steering.vectors passes the edge (the Generator registers it; this bare
    # in-process engine has no SAE vectors, so the engine answers, naming what it has)
    with pytest.raises(OpenAIError) as err:
        asyncio.run(s.completions(body("Mia is", steering={"vectors": [{"name": index, "coeff": 1}]})))
    assert err.value.status_code == 404 and "sae:sunny" not in err.value.message
