"""Steering vectors: GGUF / safetensors files, the library, extraction that changes behaviour."""

from __future__ import annotations

import os
import time

import gguf
import numpy as np
import pytest
import torch

from models.builtin import resolve_source
from models.steering.config import SteeringConfig
from models.steering.vectors import (
    SteeringVector,
    VectorLibrary,
    VectorShapeError,
    VectorValueError,
    ensure_default_vectors,
    extract_vector,
    load_gguf,
    load_safetensors,
    load_vector,
    save_gguf,
    save_safetensors,
    steered_transformers,
    transformers_hidden_states,
)

HAPPY = ["I feel happy", "What a happy day", "She was happy and smiled", "happy happy"]
SAD = ["I feel sad", "What a sad day", "She was sad and cried", "sad sad"]


@pytest.fixture(scope="module")
def big():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_source("builtin:tiny").big
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return path, model, AutoTokenizer.from_pretrained(path)


def _vector(name="v", layers=(1, 2, 3), hidden=128, seed=0) -> SteeringVector:
    g = torch.Generator().manual_seed(seed)
    dirs = {layer: torch.randn(hidden, generator=g) for layer in layers}
    return SteeringVector(name, dirs, model_hint="qwen3", metadata={"method": "mean"})


def test_gguf_round_trip(tmp_path):
    vector = _vector()
    save_gguf(vector, tmp_path / "v.gguf")
    loaded = load_gguf(tmp_path / "v.gguf")
    assert loaded.name == "v" and loaded.model_hint == "qwen3"
    assert loaded.metadata == {"method": "mean"}
    assert loaded.layers == [1, 2, 3]
    for layer in vector.layers:
        assert torch.equal(loaded.directions[layer], vector.directions[layer])


def test_safetensors_round_trip(tmp_path):
    vector = _vector(layers=(0, 2))
    save_safetensors(vector, tmp_path / "v.safetensors")
    loaded = load_safetensors(tmp_path / "v.safetensors")
    assert loaded.name == "v" and loaded.layers == [0, 2]
    assert torch.equal(loaded.as_tensor(4), vector.as_tensor(4))


def test_gguf_written_in_llama_cpp_layout_loads(tmp_path):
    """A file written by hand the way llama.cpp's control-vector generator writes it."""
    path = tmp_path / "happy.gguf"
    writer = gguf.GGUFWriter(str(path), "controlvector")
    writer.add_string("controlvector.model_hint", "qwen3")
    writer.add_int32("controlvector.layer_count", 3)
    rows = np.arange(3 * 128, dtype=np.float32).reshape(3, 128) / 100
    for il in range(1, 4):  # llama.cpp: direction.{il} for il = 1 .. n_layer - 1
        writer.add_tensor(f"direction.{il}", rows[il - 1])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    vector = load_gguf(path)
    assert vector.name == "happy" and vector.model_hint == "qwen3"
    as_tensor = vector.as_tensor(4)  # direction.N steers the output of block N
    assert torch.equal(as_tensor[0], torch.zeros(128))
    assert torch.equal(as_tensor[1:], torch.from_numpy(rows))


def test_not_a_control_vector_is_refused(tmp_path):
    path = tmp_path / "model.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("direction.1", np.zeros(4, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="not a control vector"):
        load_gguf(path)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 1e38])
@pytest.mark.parametrize("suffix", [".gguf", ".safetensors"])
def test_poisoned_vector_files_are_refused(tmp_path, value, suffix):
    vector = _vector(layers=(1, 2))
    vector.directions[2][5] = value  # past the checks of the constructor
    path = tmp_path / f"v{suffix}"
    (save_gguf if suffix == ".gguf" else save_safetensors)(vector, path)
    with pytest.raises(VectorValueError, match="layer 2 (holds NaN or infinite|has norm)"):
        load_vector(path)
    with pytest.raises(VectorValueError):
        SteeringVector("w", {0: torch.full((8,), value)})


def test_library_refuses_vectors_that_do_not_fit(tmp_path):
    library = VectorLibrary(tmp_path, num_layers=4, hidden_size=128)
    with pytest.raises(VectorShapeError, match=r"hidden size 64.*hidden size 128"):
        library.add(_vector(hidden=64))
    with pytest.raises(VectorShapeError, match=r"layers 1\.\.6.*4 layers"):
        library.add(_vector(layers=(1, 6)))
    # a file dropped into the directory by hand is checked when read
    save_gguf(_vector("wide", hidden=256), tmp_path / "wide.gguf")
    with pytest.raises(VectorShapeError, match=r"256.*128"):
        library.get("wide")


def test_library_persists_lists_and_removes(tmp_path):
    library = VectorLibrary(tmp_path, num_layers=4, hidden_size=128)
    library.add(_vector("calm", seed=1))
    library.add(_vector("bold", seed=2))
    again = VectorLibrary(tmp_path, num_layers=4, hidden_size=128)
    assert again.list() == ["bold", "calm"]
    assert torch.equal(again.get("calm").as_tensor(4), _vector("calm", seed=1).as_tensor(4))
    again.remove("calm")
    assert again.list() == ["bold"]
    with pytest.raises(KeyError, match="'calm' not found; known: bold"):
        again.get("calm")
    with pytest.raises(ValueError, match="invalid steering vector name"):
        again.add(_vector("../escape"))


def _next_token_margin(model, tokenizer, prompts, plus: str, minus: str) -> float:
    """Mean over prompts of logit(first token of `plus`) - logit(first token of `minus`)."""
    up = tokenizer(plus).input_ids[0]
    down = tokenizer(minus).input_ids[0]
    margins = []
    with torch.no_grad():
        for prompt in prompts:
            logits = model(tokenizer(prompt, return_tensors="pt").input_ids).logits[0, -1]
            margins.append(float(logits[up] - logits[down]))
    return sum(margins) / len(margins)


@pytest.mark.parametrize("method", ["mean", "pca"])
def test_extracted_vector_pushes_its_behaviour(big, method):
    _, model, tokenizer = big
    read = transformers_hidden_states(model, tokenizer, pool="last")
    vector = extract_vector("happy", read, HAPPY, SAD, layers=[1, 2, 3], method=method)
    assert vector.layers == [1, 2, 3] and vector.hidden_size == 128

    prompts = ["The weather today is", "My friend told me", "After the long walk we were"]
    plain = _next_token_margin(model, tokenizer, prompts, " happy", " sad")
    with steered_transformers(model, vector, coeff=4.0):
        pushed = _next_token_margin(model, tokenizer, prompts, " happy", " sad")
    with steered_transformers(model, vector, coeff=-4.0):
        pulled = _next_token_margin(model, tokenizer, prompts, " happy", " sad")
    assert pushed > plain + 0.5 and pulled < plain - 0.5

    # the steered model's own states move along the extracted direction
    base = read(prompts)[:, 3] @ vector.directions[3]
    with steered_transformers(model, vector, coeff=1.0, layers=[2]):
        moved = read(prompts)[:, 3] @ vector.directions[3]
    assert bool((moved > base).all())


def test_pca_direction_aligns_with_mean(big):
    _, model, tokenizer = big
    read = transformers_hidden_states(model, tokenizer)
    mean = extract_vector("m", read, HAPPY, SAD, layers=[2], method="mean").directions[2]
    pca = extract_vector("p", read, HAPPY, SAD, layers=[2], method="pca").directions[2]
    assert float(torch.cosine_similarity(mean, pca, dim=0)) > 0.5


def test_mismatched_pairs_are_refused(big):
    _, model, tokenizer = big
    read = transformers_hidden_states(model, tokenizer)
    with pytest.raises(ValueError, match="3 positive and 2 negative"):
        extract_vector("x", read, HAPPY[:3], SAD[:2])
    with pytest.raises(VectorShapeError, match=r"layers \[9\] outside 0\.\.3"):
        extract_vector("x", read, HAPPY, SAD, layers=[9])


def test_default_vectors_are_extracted_once_and_cached(big, tmp_path):
    path, model, tokenizer = big
    file_vector = _vector("from_file", seed=3)
    save_safetensors(file_vector, tmp_path / "ff.safetensors")
    config = SteeringConfig.model_validate(
        {
            "vectors": [
                {
                    "name": "happy",
                    "positive": HAPPY,
                    "negative": SAD,
                    "method": "pca",
                    "pool": "mean",
                },
                {"name": "from_file", "path": str(tmp_path / "ff.safetensors")},
            ]
        }
    )
    library = VectorLibrary(tmp_path / "lib", num_layers=4, hidden_size=128)
    assert ensure_default_vectors(config, path, library) == ["happy", "from_file"]
    assert library.list() == ["from_file", "happy"]
    happy = library.get("happy")
    assert happy.layers == [1, 2]  # the middle half of 4 blocks
    assert happy.metadata["method"] == "pca" and happy.metadata["pool"] == "mean"
    assert torch.equal(library.get("from_file").as_tensor(4), file_vector.as_tensor(4))

    stamp = os.stat(tmp_path / "lib" / "happy.gguf").st_mtime_ns
    time.sleep(0.01)
    started = time.perf_counter()
    ensure_default_vectors(config, path, library)  # cached: no model load, no extraction
    assert time.perf_counter() - started < 0.5
    assert os.stat(tmp_path / "lib" / "happy.gguf").st_mtime_ns == stamp


def test_a_changed_vector_spec_is_extracted_again(big, tmp_path):
    path, model, tokenizer = big
    spec = {"name": "happy", "positive": HAPPY, "negative": SAD}
    library = VectorLibrary(tmp_path / "lib", num_layers=4, hidden_size=128)
    ensure_default_vectors(SteeringConfig.model_validate({"vectors": [spec]}), path, library)
    first = library.get("happy")
    ensure_default_vectors(SteeringConfig.model_validate({"vectors": [spec]}), path, library)
    assert library.get("happy").metadata["spec"] == first.metadata["spec"]  # cached
    changed = {**spec, "pool": "mean"}
    ensure_default_vectors(SteeringConfig.model_validate({"vectors": [changed]}), path, library)
    again = library.get("happy")
    assert again.metadata["spec"] != first.metadata["spec"] and again.metadata["pool"] == "mean"
    assert not torch.equal(again.directions[1], first.directions[1])


def test_a_poisoned_file_already_in_the_library_is_left_out(tmp_path):
    """A NaN vector written before uploads were checked neither stops the replica's start
    (sync) nor the listing; the good ones are served."""
    from models.steering.vector_service import VectorService

    service = VectorService(SteeringConfig(vector_dir=str(tmp_path)), resolve_source("builtin:tiny").big)
    layers, hidden = service.library.num_layers, service.library.hidden_size
    service.library.add(SteeringVector("good", {1: torch.ones(hidden)}))
    poisoned = SteeringVector("bad", {1: torch.ones(hidden)})
    poisoned.directions[1][0] = float("nan")
    save_gguf(poisoned, tmp_path / "bad.gguf")

    class Engine:  # records registrations (plumbing stand-in)
        registered: dict = {}

        def register_vector(self, name, vector):
            assert vector.shape == (layers, hidden)
            self.registered[name] = vector

    engine = Engine()
    service.sync(engine)
    assert list(engine.registered) == ["good"]
    assert [v["id"] for v in service.describe()] == ["good"]
