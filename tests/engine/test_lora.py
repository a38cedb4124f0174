"""Per-row LoRA in the torch engine against PEFT on a tiny random checkpoint."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from models.engine.config import EngineConfig
from models.engine.llm_engine import LLMEngine
from models.engine.tiny_checkpoint import build_tiny_checkpoint
from models.protocol.errors import AdapterNotFoundError, EngineError
from models.protocol.requests import GenerationRequest, SamplingParams

PROMPT = [10, 20, 30, 40, 50, 60]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return build_tiny_checkpoint(tmp_path_factory.mktemp("lora_base"), "qwen3", seed=3)


def make_adapter(base, path, seed: int, rank: int = 8, targets=TARGETS):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base))
    config = LoraConfig(r=rank, lora_alpha=16, target_modules=targets, init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():  # PEFT's non-default init is small; make the effect clearly visible
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.mul_(20)
    peft_model.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def adapters(base, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {
        "alpha": make_adapter(base, root / "alpha", seed=10),
        "beta": make_adapter(base, root / "beta", seed=11, rank=4, targets=["q_proj", "v_proj"]),
    }


def peft_greedy(base, adapter_dirs: dict, weights: dict[str, float] | None, n: int) -> list[int]:
    """Greedy tokens of the base model with sum_i w_i * delta_i merged into its weights."""
    from peft import PeftModel

    model = AutoModelForCausalLM.from_pretrained(str(base)).eval()
    for name, w in (weights or {}).items():
        peft_model = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(str(base)), str(adapter_dirs[name])
        )
        merged = peft_model.merge_and_unload().state_dict()
        plain = AutoModelForCausalLM.from_pretrained(str(base)).state_dict()
        with torch.no_grad():
            for key, p in model.state_dict().items():
                p += w * (merged[key] - plain[key])
    out = model.generate(
        torch.tensor([PROMPT]), max_new_tokens=n, min_new_tokens=n, do_sample=False
    )
    return out[0, len(PROMPT) :].tolist()


def make_engine(base, **config) -> LLMEngine:
    return LLMEngine(EngineConfig(num_kv_blocks=64, block_size=4, **config), base)


def request(rid: str, adapter=None, weights=None) -> GenerationRequest:
    params = SamplingParams(max_tokens=10, temperature=0)
    return GenerationRequest(rid, list(PROMPT), params, adapter=adapter, adapter_weights=weights)


def run(eng: LLMEngine, *requests: GenerationRequest) -> dict[str, list[int]]:
    for r in requests:
        eng.add_request(r)
    got: dict[str, list[int]] = {}
    while eng.has_unfinished():
        for out in eng.step():
            got.setdefault(out.request_id, []).extend(out.token_ids)
            if out.finish_reason == "error":
                raise AssertionError(out.error)
    return got


def test_adapter_matches_peft_merged_model(base, adapters):
    eng = make_engine(base)
    eng.adapters.load("alpha", str(adapters["alpha"]))
    got = run(eng, request("a", "alpha"))["a"]
    assert got == peft_greedy(base, adapters, {"alpha": 1.0}, 10)
    assert got != peft_greedy(base, adapters, None, 10)


def test_mixed_batch_matches_each_row_alone(base, adapters):
    eng = make_engine(base)
    for name, path in adapters.items():
        eng.adapters.load(name, str(path))
    together = run(eng, request("base"), request("a", "alpha"), request("b", "beta"))
    assert together["base"] == run(make_engine(base), request("x"))["x"]
    for rid, name in (("a", "alpha"), ("b", "beta")):
        alone = make_engine(base)
        alone.adapters.load(name, str(adapters[name]))
        assert together[rid] == run(alone, request("x", name))["x"]
    assert len({tuple(v) for v in together.values()}) == 3


def test_router_mix_equals_weighted_merge(base, adapters):
    eng = make_engine(base)
    for name, path in adapters.items():
        eng.adapters.load(name, str(path))
    mix = {"alpha": 0.7, "beta": 0.3}
    got = run(eng, request("m", weights=mix))["m"]
    assert got == peft_greedy(base, adapters, mix, 10)


def test_eviction_and_reload_keep_outputs(base, adapters):
    eng = make_engine(base, max_adapters_per_replica=1)
    eng.adapters.load("alpha", str(adapters["alpha"]))
    first = run(eng, request("a1", "alpha"))["a1"]
    eng.adapters.load("beta", str(adapters["beta"]))  # evicts alpha (least recently used)
    assert eng.adapters.resident() == ["beta"] and eng.adapters.names() == ["alpha", "beta"]
    again = run(eng, request("a2", "alpha"))["a2"]  # read back from its path
    assert again == first and eng.adapters.resident() == ["alpha"]


def test_bad_adapters_error_clearly_and_unload_nothing(base, adapters, tmp_path):
    eng = make_engine(base, max_lora_rank=4)
    eng.adapters.load("beta", str(adapters["beta"]))
    with pytest.raises(EngineError, match="rank 8 exceeds this engine's max_lora_rank 4"):
        eng.adapters.load("alpha", str(adapters["alpha"]))
    with pytest.raises(EngineError, match="not a PEFT LoRA directory"):
        eng.adapters.load("ghost", str(tmp_path / "missing"))
    broken = shutil.copytree(adapters["beta"], tmp_path / "broken")
    (broken / "adapter_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(EngineError, match="cannot read"):
        eng.adapters.load("broken", str(broken))
    odd = shutil.copytree(adapters["beta"], tmp_path / "odd")
    cfg = json.loads((odd / "adapter_config.json").read_text())
    cfg["target_modules"] = ["q_proj", "lm_head"]
    (odd / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(EngineError, match="lm_head"):
        eng.adapters.load("odd", str(odd))
    assert eng.adapters.names() == ["beta"] and eng.adapters.resident() == ["beta"]
    with pytest.raises(AdapterNotFoundError, match="'nope' is not loaded; loaded: beta"):
        eng.add_request(request("n", "nope"))
    assert run(eng, request("b", "beta"))["b"]  # still serving


@pytest.mark.parametrize("poison", ["nan", "inf", "huge", "alpha"])
def test_poisoned_adapters_are_refused_and_others_keep_serving(base, adapters, tmp_path, poison):
    from safetensors.torch import load_file, save_file

    eng = make_engine(base)
    eng.adapters.load("beta", str(adapters["beta"]))
    before = run(eng, request("b0", "beta"))["b0"]
    bad = shutil.copytree(adapters["beta"], tmp_path / poison)
    if poison == "alpha":
        cfg = json.loads((bad / "adapter_config.json").read_text())
        cfg["lora_alpha"] = float("nan")  # json writes NaN, and json.loads reads it back
        (bad / "adapter_config.json").write_text(json.dumps(cfg))
    else:
        tensors = load_file(str(bad / "adapter_model.safetensors"))
        key = next(k for k in tensors if ".lora_B." in k)
        value = {"nan": float("nan"), "inf": float("inf"), "huge": 1e38}[poison]
        tensors[key][0, 0] = value  # huge: finite in float32, but times the scale it is not
        save_file(tensors, str(bad / "adapter_model.safetensors"))
    with pytest.raises(EngineError, match="NaN or infinite|not a number"):
        eng.adapters.load("bad", str(bad))
    assert eng.adapters.names() == ["beta"]
    assert run(eng, request("b1", "beta"))["b1"] == before


def test_unload_adapter(base, adapters):
    eng = make_engine(base)
    eng.adapters.load("alpha", str(adapters["alpha"]))
    eng.adapters.unload("alpha")
    assert eng.adapters.names() == []
    with pytest.raises(AdapterNotFoundError):
        eng.add_request(request("a", "alpha"))


def test_torch_engine_loads_adapters_in_its_thread(base, adapters):
    import asyncio

    from models.engine import build_engine

    async def main():
        eng = build_engine(EngineConfig(num_kv_blocks=64, block_size=4), str(base))
        await eng.start()
        await eng.load_adapter("alpha", str(adapters["alpha"]))
        with pytest.raises(EngineError, match="not a PEFT LoRA directory"):
            await eng.load_adapter("ghost", "/nonexistent")
        outs = [o async for o in eng.generate(request("a", "alpha"))]
        with pytest.raises(AdapterNotFoundError, match="loaded: alpha"):
            [o async for o in eng.generate(request("n", "nope"))]
        names = eng.adapters()
        eng.shutdown()
        return [t for o in outs for t in o.token_ids], names

    got, names = asyncio.run(main())
    assert names == ["alpha"]
    alone = make_engine(base)
    alone.adapters.load("alpha", str(adapters["alpha"]))
    assert got == run(alone, request("x", "alpha"))["x"]


def test_a_fixed_adapter_set_frees_the_projections_it_does_not_touch(base, adapters):
    eng = make_engine(base)
    eng.adapters.load("beta", str(adapters["beta"]))  # q_proj and v_proj only
    want = run(eng, request("a", "beta"), request("b"))
    assert eng.adapters.drop_unused_linears() == 3 * eng.args.num_layers  # o, gate_up, down
    layer = eng.runner.model.layers[0]
    assert layer.self_attn.qkv_proj.lora_a is not None
    assert layer.self_attn.o_proj.lora_a is None and layer.mlp.down_proj.lora_a is None
    assert run(eng, request("a2", "beta"), request("b2")) == {"a2": want["a"], "b2": want["b"]}
    with pytest.raises(EngineError, match="fixed"):
        eng.adapters.load("alpha", str(adapters["alpha"]))
