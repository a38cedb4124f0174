"""The toy model's shipped sparse autoencoder: it reconstructs the residual stream, its named
features mean what their names say, `/v1/features/extract`'s reader finds them per token, and a
feature's decoder direction is a steering vector `sae:<name|index>` the engine applies."""

from __future__ import annotations

import pytest
import torch

from models.activations.reader import ActivationReader
from models.builtin import TOY_DIR
from models.builtin.sae import fve, layer_states
from models.builtin.sae_features import eval_texts, mood_texts, name_features
from models.engine.config import EngineConfig
from models.engine.llm_engine import LLMEngine
from models.protocol.requests import GenerationRequest, SamplingParams, SteerVectorSpec
from models.steering.config import SteeringConfig
from models.steering.sae import load_sae, sae_feature
from models.steering.vector_service import VectorService, VectorUploadError
from models.steering.vectors import load_transformers_model


@pytest.fixture(scope="module")
def sae():
    return load_sae(TOY_DIR / "sae")


@pytest.fixture(scope="module")
def big():
    return load_transformers_model(str(TOY_DIR / "big"))


def test_it_reconstructs_held_out_states_and_stays_sparse(sae, big):
    x = layer_states(*big, eval_texts(777, 40), sae.layer)
    assert fve(sae, x) >= 0.8
    assert int((sae.encode(x) > 0).sum(-1).max()) <= sae.k


def test_named_features_mean_what_they_say(sae, big):
    """The shipped names, on texts they were not found on: precise, and firing often enough."""
    found = name_features(sae, *big, eval_texts(778, 40), mood_texts(779, 40), sae.names)
    for concept, least in (("person", 0.7), ("positive", 0.5), ("negative", 0.7),
                           ("sunny", 0.9), ("gloomy", 0.9)):  # fmt: skip
        feature = found[concept]
        assert feature["feature"] == sae.names[concept]
        assert feature["precision"] >= least and feature["recall"] >= 0.08, (concept, feature)


def test_extract_gives_each_token_its_top_features_with_names(sae):
    reader = ActivationReader(str(TOY_DIR / "big"), {}, {}, sae)
    (text,) = reader.extract(["Tom has the red ball. Ben is sad."], top_k=4)
    tokens = text["tokens"]
    assert "".join(t["token"] for t in tokens) == "Tom has the red ball. Ben is sad."
    assert all(1 <= len(t["features"]) <= 4 for t in tokens)
    acts = [[f["activation"] for f in t["features"]] for t in tokens]
    assert all(a == sorted(a, reverse=True) for a in acts)
    names = {t["token"].strip(): {f["name"] for f in t["features"]} for t in tokens}
    assert "person" in names["Ben"] and "color" in names["red"]
    assert "person" not in names["ball"] and "color" not in names["Ben"]


def test_an_sae_feature_is_a_steering_vector_by_name_or_index(sae, tmp_path):
    config = SteeringConfig(sae="builtin", vector_dir=str(tmp_path))
    service = VectorService(config, str(TOY_DIR / "big"))
    assert "sae:positive" in service.names()
    (desc,) = service.describe("sae:positive")
    assert desc["layers"] == [sae.layer] and desc["metadata"]["sae_feature"] == sae.names["positive"]
    eng = LLMEngine(EngineConfig(num_kv_blocks=64, block_size=16, dtype="float32"),
                    str(TOY_DIR / "big"))  # fmt: skip
    service.sync(eng)
    index = f"sae:{sae.names['negative']}"
    assert not service.registered(["sae:positive", index])  # an index: registered on demand
    service.sync(eng)
    assert service.registered(["sae:positive", index])
    assert sae_feature(sae, "sae:nope") is None and sae_feature(sae, "positive") is None
    expected = sae.direction(sae.names["positive"])
    torch.testing.assert_close(eng.vectors["sae:positive"][sae.layer], expected)
    assert float(eng.vectors["sae:positive"].abs().sum()) == pytest.approx(
        float(expected.abs().sum()))  # its layer only  # fmt: skip

    def run(spec):
        eng.add_request(GenerationRequest("r", eng.tokenizer("Tom feels").input_ids,
                                          SamplingParams(max_tokens=8, temperature=0),
                                          steer_vectors=spec))  # fmt: skip
        out = []
        while eng.has_unfinished():
            out += [t for o in eng.step() for t in o.token_ids]
        return out

    assert run([SteerVectorSpec("sae:positive", 8.0)]) != run([])
    with pytest.raises(VectorUploadError):
        service.remove("sae:positive")


def test_a_configured_sae_must_fit_the_model(tmp_path):
    from models.builtin import resolve_source

    with pytest.raises(ValueError, match="builtin:toy"):
        VectorService(SteeringConfig(sae="builtin", vector_dir=str(tmp_path)),
                      resolve_source("builtin:tiny").big)  # fmt: skip


def test_extract_refuses_what_it_cannot_read(sae):
    from models.activations.reader import ActivationRequestError

    reader = ActivationReader(str(TOY_DIR / "big"), {}, {}, sae)
    for texts, top_k in (([""], 3), (["\ud800"], 3), (["a"] * 17, 3), (["a " * 2000], 3),
                         (["Mia"], 0), (["Mia"], 33)):  # fmt: skip
        with pytest.raises(ActivationRequestError):
            reader.extract(texts, top_k)
