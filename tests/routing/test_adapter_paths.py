"""Adapter path confinement and PEFT directory inspection, on real files and a real PEFT save."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from models.protocol.errors import EngineError
from models.routing.adapter_paths import (
    AdapterConfigError,
    AdapterDirNotFoundError,
    AdapterPathError,
    AdapterPathNotAllowedError,
    AdapterUnfitError,
    AdapterWeightsError,
    inspect_adapter_dir,
    resolve_adapter_path,
)

RANK = 4


def save_tiny_lora(directory: Path, safe: bool = True) -> Path:
    """A real PEFT LoRA of a one-layer Llama, saved as safetensors or a torch .bin."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    model = LlamaForCausalLM(config)
    model.name_or_path = "tiny-llama"  # PEFT records the base model's name from here
    lora = LoraConfig(r=RANK, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    get_peft_model(model, lora).save_pretrained(str(directory), safe_serialization=safe)
    return directory


@pytest.fixture(scope="module")
def peft_dir(tmp_path_factory) -> Path:
    return save_tiny_lora(tmp_path_factory.mktemp("lora") / "tiny")


@pytest.fixture
def roots(tmp_path) -> tuple[Path, Path]:
    """Two adapter roots with one adapter dir each, and a directory outside both."""
    root_a, root_b, outside = tmp_path / "a", tmp_path / "b", tmp_path / "outside"
    for d in (root_a / "rewrite", root_b / "qa", outside / "secret"):
        d.mkdir(parents=True)
    return root_a, root_b


def test_relative_and_absolute_paths_inside_roots_resolve(roots):
    root_a, root_b = roots
    allowed = [str(root_a), str(root_b)]
    assert resolve_adapter_path("rewrite", allowed) == (root_a / "rewrite").resolve()
    assert resolve_adapter_path("qa", allowed) == (root_b / "qa").resolve()
    assert resolve_adapter_path("qa/../qa", allowed) == (root_b / "qa").resolve()
    assert resolve_adapter_path(str(root_b / "qa"), allowed) == (root_b / "qa").resolve()


@pytest.mark.parametrize("path", ["../outside/secret", "rewrite/../../outside/secret", ".."])
def test_dotdot_escapes_are_refused(roots, path):
    with pytest.raises(AdapterPathNotAllowedError) as err:
        resolve_adapter_path(path, [str(r) for r in roots])
    assert err.value.status_code == 400
    assert err.value.code == "adapter_path_not_allowed"
    assert str(roots[0].parent) not in err.value.message  # no server paths leak to clients


def test_symlink_out_of_root_is_refused(roots):
    root_a, _ = roots
    os.symlink(root_a.parent / "outside" / "secret", root_a / "innocent")
    with pytest.raises(AdapterPathNotAllowedError):
        resolve_adapter_path("innocent", [str(root_a)])
    with pytest.raises(AdapterPathNotAllowedError):
        resolve_adapter_path(str(root_a / "innocent"), [str(root_a)])


def test_symlink_inside_root_resolves_to_its_target(roots):
    root_a, _ = roots
    os.symlink(root_a / "rewrite", root_a / "alias")
    assert resolve_adapter_path("alias", [str(root_a)]) == (root_a / "rewrite").resolve()


def test_absolute_path_outside_roots_is_refused(roots):
    with pytest.raises(AdapterPathNotAllowedError):
        resolve_adapter_path(str(roots[0].parent / "outside" / "secret"), [str(roots[0])])
    with pytest.raises(AdapterPathNotAllowedError):
        resolve_adapter_path("/etc", [str(r) for r in roots])


def test_missing_path_is_404_and_bad_inputs_are_400(roots):
    allowed = [str(r) for r in roots]
    with pytest.raises(AdapterDirNotFoundError) as err:
        resolve_adapter_path("nope", allowed)
    assert (err.value.status_code, err.value.code) == (404, "adapter_not_found")
    (roots[0] / "file.txt").write_text("x")
    with pytest.raises(AdapterPathError, match="not a directory"):
        resolve_adapter_path("file.txt", allowed)
    with pytest.raises(AdapterPathError, match="non-empty"):
        resolve_adapter_path("", allowed)
    with pytest.raises(AdapterPathNotAllowedError, match="adapter_roots is empty"):
        resolve_adapter_path("rewrite", [])


def test_reads_a_real_peft_dir(peft_dir):
    info = inspect_adapter_dir(peft_dir)
    assert info.rank == RANK
    assert info.lora_alpha == 8
    assert sorted(info.target_modules) == ["q_proj", "v_proj"]
    assert info.base_model_name_or_path == "tiny-llama"
    assert info.weights_file.endswith("adapter_model.safetensors")
    assert info.num_tensors == 4  # q and v, A and B, one layer


def test_reads_a_torch_bin_peft_dir(tmp_path):
    info = inspect_adapter_dir(save_tiny_lora(tmp_path / "bin", safe=False))
    assert info.weights_file.endswith("adapter_model.bin")
    assert info.rank == RANK


def copy_of(peft_dir: Path, to: Path) -> Path:
    to.mkdir()
    for f in peft_dir.iterdir():
        (to / f.name).write_bytes(f.read_bytes())
    return to


def test_missing_dir_is_404(tmp_path):
    with pytest.raises(AdapterDirNotFoundError) as err:
        inspect_adapter_dir(tmp_path / "gone")
    assert err.value.status_code == 404
    assert isinstance(err.value, EngineError)


def test_missing_or_corrupt_config_is_400(peft_dir, tmp_path):
    d = copy_of(peft_dir, tmp_path / "d")
    config_file = d / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config_file.unlink()
    with pytest.raises(AdapterConfigError, match="no adapter_config.json") as err:
        inspect_adapter_dir(d)
    assert (err.value.status_code, err.value.code) == (400, "invalid_adapter_config")
    config_file.write_text("{not json")
    with pytest.raises(AdapterConfigError, match="not valid JSON"):
        inspect_adapter_dir(d)
    config_file.write_text(json.dumps({**config, "r": "four"}))
    with pytest.raises(AdapterConfigError, match="'r' must be a positive integer"):
        inspect_adapter_dir(d)


def test_corrupt_or_missing_weights_are_400(peft_dir, tmp_path):
    d = copy_of(peft_dir, tmp_path / "d")
    weights = d / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterWeightsError, match="cannot read") as err:
        inspect_adapter_dir(d)
    assert (err.value.status_code, err.value.code) == (400, "invalid_adapter_weights")
    weights.write_bytes(b"\x00" * 64)
    with pytest.raises(AdapterWeightsError):
        inspect_adapter_dir(d)
    weights.unlink()
    with pytest.raises(AdapterWeightsError, match="has no adapter_model"):
        inspect_adapter_dir(d)
    (d / "adapter_model.bin").write_bytes(b"not a pickle")
    with pytest.raises(AdapterWeightsError, match="cannot read adapter_model.bin"):
        inspect_adapter_dir(d)


def test_unfit_adapters_are_400(peft_dir, tmp_path):
    d = copy_of(peft_dir, tmp_path / "d")
    config_file = d / "adapter_config.json"
    config = json.loads(config_file.read_text())
    with pytest.raises(AdapterUnfitError, match="at most 2") as err:
        inspect_adapter_dir(d, max_rank=2)
    assert (err.value.status_code, err.value.code) == (400, "adapter_unfit")
    config_file.write_text(json.dumps({**config, "r": 8}))
    with pytest.raises(AdapterUnfitError, match="has rank 4 but r = 8"):
        inspect_adapter_dir(d)
    config_file.write_text(json.dumps({**config, "peft_type": "PREFIX_TUNING"}))
    with pytest.raises(AdapterUnfitError, match="only LoRA"):
        inspect_adapter_dir(d)


def test_roots_may_start_with_home(roots, monkeypatch):
    root_a, _ = roots
    monkeypatch.setenv("HOME", str(root_a.parent))
    assert resolve_adapter_path("rewrite", ["~/a"]) == (root_a / "rewrite").resolve()
    with pytest.raises(AdapterDirNotFoundError):
        resolve_adapter_path("~/a/rewrite", ["~/a"])  # client paths are never expanded
