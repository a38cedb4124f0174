"""builtin:tiny builds, caches and loads offline; resolve_source checks what it is given."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from models.builtin import ModelSourceError, resolve_adapter, resolve_source

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("TANDEM_CACHE", str(cache))
    yield resolve_source("builtin:tiny"), cache
    mp.undo()


def test_tiny_loads_offline_and_chats(tiny, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    paths, _ = tiny
    tok = AutoTokenizer.from_pretrained(paths.big)
    model = AutoModelForCausalLM.from_pretrained(paths.big)
    assert model.config.model_type == "qwen3"
    assert model.config.hidden_size == 128 and model.config.num_hidden_layers == 4
    assert model.config.vocab_size == len(tok)
    assert model.generation_config.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.eos_token == "<|im_end|>" and tok.pad_token is not None
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, return_dict=False
    )
    text = tok.decode(ids)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    out = model.generate(torch.tensor([ids]), max_new_tokens=5, do_sample=False)
    assert out.shape[1] > len(ids)
    small = AutoModelForCausalLM.from_pretrained(paths.small)
    assert small.config.hidden_size == 64 and small.config.vocab_size == len(tok)
    assert AutoTokenizer.from_pretrained(paths.small).get_vocab() == tok.get_vocab()


def test_tiny_adapters_change_outputs(tiny):
    from peft import PeftModel

    paths, _ = tiny
    assert set(paths.adapters) == {"rewrite", "qa", "list"}
    assert set(paths.small_adapters) == {"positive"}
    base = AutoModelForCausalLM.from_pretrained(paths.big)
    x = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        plain = base(x).logits
        model = PeftModel.from_pretrained(base, paths.adapters["qa"], adapter_name="qa")
        model.load_adapter(paths.adapters["list"], adapter_name="list")
        model.set_adapter("qa")
        qa = model(x).logits
        model.set_adapter("list")
        listed = model(x).logits
    assert not torch.allclose(plain, qa, atol=1e-4)
    assert not torch.allclose(qa, listed, atol=1e-4)
    assert resolve_adapter("builtin:qa", paths) == paths.adapters["qa"]
    with pytest.raises(ModelSourceError, match="known: list, qa, rewrite"):
        resolve_adapter("builtin:legal", paths)


def test_tiny_is_cached_and_deterministic(tiny, tmp_path):
    paths, cache = tiny
    assert resolve_source("builtin:tiny").big == paths.big  # second call: same cached dir
    # Two processes racing on an empty cache both succeed and agree with the first build.
    code = "from models.builtin import resolve_source; print(resolve_source('builtin:tiny').big)"
    env = {"TANDEM_CACHE": str(tmp_path), "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen([sys.executable, "-c", code], env=env, cwd=ROOT, stdout=subprocess.PIPE)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=120)[0].decode().strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert outs[0] == outs[1]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("tiny-")] == [
        Path(outs[0]).parent.name
    ]
    a = load_file(Path(paths.big) / "model.safetensors")
    b = load_file(Path(outs[0]) / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_small_alias_and_plain_paths(tiny, tmp_path):
    paths, _ = tiny
    small = resolve_source("builtin:tiny-small")
    assert small.big == paths.small and small.small is None
    assert resolve_source(paths.big).big == paths.big
    with pytest.raises(ModelSourceError, match="no config.json"):
        resolve_source(str(tmp_path))
    with pytest.raises(ModelSourceError, match="unknown built-in model"):
        resolve_source("builtin:huge")


def test_toy_is_shipped_small_and_shares_the_tokenizer():
    import json

    paths = resolve_source("builtin:toy")
    assert set(paths.adapters) == {"rewrite", "qa", "list", "tools"}  # tools: tool_task.py
    assert set(paths.small_adapters) == {"positive"}
    big = AutoModelForCausalLM.from_pretrained(paths.big, dtype=torch.float32)
    small = AutoModelForCausalLM.from_pretrained(paths.small, dtype=torch.float32)
    assert sum(p.numel() for p in big.parameters()) <= 20_000_000
    assert sum(p.numel() for p in small.parameters()) <= 3_000_000
    assert big.config.model_type == small.config.model_type == "qwen3"
    tok = AutoTokenizer.from_pretrained(paths.big)
    assert AutoTokenizer.from_pretrained(paths.small).get_vocab() == tok.get_vocab()
    for path in [*paths.adapters.values(), *paths.small_adapters.values()]:
        config = json.loads((Path(path) / "adapter_config.json").read_text())
        assert config["r"] <= 16
    assert resolve_source("builtin:toy-small").big == paths.small
