"""Hidden-state capture in the torch engine's step against transformers (CPU, float32): the
residual stream after chosen blocks, for rows that ask, in batches mixing LoRA, steering
vectors and rows that ask for nothing."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from models.engine.config import EngineConfig
from models.engine.llm_engine import LLMEngine
from models.engine.tiny_checkpoint import build_tiny_checkpoint
from models.protocol.errors import EngineError
from models.protocol.requests import GenerationRequest, SamplingParams, SteerVectorSpec
from models.protocol.steering import (
    ForwardPass,
    Prefilled,
    RowActions,
    SteeringRequest,
    StepObserver,
)
from models.steering.vectors import SteeringVector, steered_transformers

PROMPTS = {"a": [11, 22, 33, 44, 55], "b": [7, 8, 9], "c": [100, 200, 300, 400], "d": [5, 6]}
TOL = dict(atol=1e-4, rtol=1e-4)  # float32, as the engine's float32 kernel checks


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build_tiny_checkpoint(tmp_path_factory.mktemp("hidden"), "qwen3", seed=4)


@pytest.fixture(scope="module")
def adapter(ckpt, tmp_path_factory):
    torch.manual_seed(5)
    model = AutoModelForCausalLM.from_pretrained(str(ckpt))
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                        init_lora_weights=False)  # fmt: skip
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.mul_(20)
    path = tmp_path_factory.mktemp("hidden_lora") / "alpha"
    peft_model.save_pretrained(str(path))
    return path


class Recorder(StepObserver):
    """Keeps every ForwardPass a row's policy sees, and Prefilled.hidden (a plumbing stand-in
    for a policy)."""

    def __init__(self):
        self.seen: dict[str, dict[int, torch.Tensor | None]] = {}
        self.prompt: dict[str, torch.Tensor | None] = {}

    def on_step(self, rows):
        for row in rows:
            for e in row.events:
                if isinstance(e, ForwardPass):
                    self.seen.setdefault(row.request_id, {})[e.step] = e.hidden
                elif isinstance(e, Prefilled):
                    self.prompt[row.request_id] = e.hidden
        return [RowActions(row.request_id) for row in rows]


def request(rid: str, layers=(), mode="colocated", n=6, positions=1, **extra) -> GenerationRequest:
    steering = None
    if layers is not None:
        params = {"hidden_layers": list(layers), "hidden_prompt_positions": positions}
        steering = SteeringRequest("record", params, mode=mode)
    return GenerationRequest(
        rid, PROMPTS[rid], SamplingParams(max_tokens=n, temperature=0), steering=steering, **extra
    )


def run(eng: LLMEngine, *requests) -> dict[str, list[int]]:
    for r in requests:
        eng.add_request(r)
    got: dict[str, list[int]] = {}
    while eng.has_unfinished():
        for out in eng.step():
            assert out.finish_reason != "error", out.error
            got.setdefault(out.request_id, []).extend(out.token_ids)
    return got


def block_outputs(model, ids: list[int]) -> list[torch.Tensor]:
    """The residual stream after every decoder block [seq, hidden] of a transformers forward
    (block outputs, taken with hooks: hidden_states[-1] is normed)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    blocks, outs = inner.model.layers, []

    def keep(_m, _i, output):
        outs.append((output[0] if isinstance(output, tuple) else output)[0].detach())

    handles = [b.register_forward_hook(keep) for b in blocks]
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([ids]))
    finally:
        for h in handles:
            h.remove()
    return outs


def check_rows(seen: dict[int, torch.Tensor], reference: list[torch.Tensor], layers, prompt_len,
               tol=TOL):  # fmt: skip
    assert sorted(seen) == list(range(len(seen))) and len(seen) >= 5
    for step, hidden in seen.items():
        assert hidden.shape == (len(layers), reference[0].shape[-1])
        for k, layer in enumerate(layers):
            want = reference[layer][prompt_len + step - 1]
            torch.testing.assert_close(hidden[k].float(), want, **tol)


def test_captured_hidden_states_match_transformers_in_a_mixed_batch(ckpt, adapter):
    hf = AutoModelForCausalLM.from_pretrained(str(ckpt)).eval()
    torch.manual_seed(0)
    vector = torch.randn(2, 64) * 3
    alone = run(LLMEngine(EngineConfig(num_kv_blocks=64, block_size=4), ckpt), request("b", None))

    recorder = Recorder()
    eng = LLMEngine(EngineConfig(num_kv_blocks=64, block_size=4), ckpt)
    eng.set_step_observer(recorder)
    eng.register_vector("v", vector)
    eng.adapters.load("alpha", str(adapter))
    got = run(
        eng,
        request("a", layers=[1, 0], positions=3),  # both blocks, asked out of order
        request("b", None),  # asks for nothing
        request("c", layers=[1], steer_vectors=[SteerVectorSpec("v", 2.0)]),
        request("d", layers=[0], adapter="alpha"),
    )
    assert got["b"] == alone["b"]  # a row that does not ask: same tokens as in a batch alone

    reference = block_outputs(hf, PROMPTS["a"] + got["a"])
    check_rows(recorder.seen["a"], reference, [1, 0], 5)
    prompt = recorder.prompt["a"]  # the prompt's last 3 tokens, at the end of its prefill
    assert prompt.shape == (3, 2, 64)
    for k, layer in enumerate([1, 0]):
        torch.testing.assert_close(prompt[:, k], reference[layer][2:5], **TOL)
    assert recorder.prompt["c"] is None  # asked for the last prompt token only
    steer = SteeringVector("v", {i: vector[i] for i in range(2)})
    with steered_transformers(hf, steer, 2.0):
        check_rows(recorder.seen["c"], block_outputs(hf, PROMPTS["c"] + got["c"]), [1], 4)
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(ckpt)),
                                     str(adapter)).eval()  # fmt: skip
    check_rows(recorder.seen["d"], block_outputs(peft, PROMPTS["d"] + got["d"]), [0], 2)
    assert "b" not in recorder.seen


def test_a_remote_policy_gets_compact_host_copies(ckpt):
    hf = AutoModelForCausalLM.from_pretrained(str(ckpt)).eval()
    recorder = Recorder()
    eng = LLMEngine(EngineConfig(num_kv_blocks=64, block_size=4), ckpt)
    eng.set_step_observer(recorder)
    got = run(eng, request("a", layers=[0], mode="sync"), request("c", layers=[], mode="sync"))
    seen = recorder.seen["a"]
    assert all(h.dtype == torch.float16 and h.device.type == "cpu" for h in seen.values())
    check_rows(seen, block_outputs(hf, PROMPTS["a"] + got["a"]), [0], 5, dict(atol=1e-2, rtol=1e-2))
    assert all(h is None for h in recorder.seen["c"].values())  # a policy row reading nothing


def test_layers_outside_the_model_are_refused_at_add(ckpt):
    eng = LLMEngine(EngineConfig(num_kv_blocks=64, block_size=4), ckpt)
    eng.set_step_observer(Recorder())
    bad = GenerationRequest("x", [1, 2], SamplingParams(max_tokens=2), hidden_layers=[2])
    with pytest.raises(EngineError, match=r"layers \[2\] outside \[0, 2\)"):
        eng.add_request(bad)
    for params, name in (({"hidden_layers": "1"}, "hidden_layers"),
                         ({"hidden_layers": [0], "hidden_prompt_positions": 0},
                          "hidden_prompt_positions")):  # fmt: skip
        steering = SteeringRequest("record", params, mode="colocated")
        with pytest.raises(EngineError, match=name) as err:
            eng.add_request(GenerationRequest("y", [1, 2], SamplingParams(max_tokens=2),
                                              steering=steering))  # fmt: skip
        assert err.value.param == f"steering.params.{name}"
    assert not eng.has_unfinished()


def test_a_client_gets_the_state_of_every_token_in_its_outputs(ckpt):
    hf = AutoModelForCausalLM.from_pretrained(str(ckpt)).eval()
    eng = LLMEngine(EngineConfig(num_kv_blocks=64, block_size=4), ckpt)
    params = SamplingParams(max_tokens=7, temperature=0)
    eng.add_request(GenerationRequest("a", PROMPTS["a"], params, hidden_layers=[1, 0]))
    eng.add_request(GenerationRequest("b", PROMPTS["b"], params))
    tokens: dict[str, list[int]] = {"a": [], "b": []}
    hidden: dict[str, list] = {"a": [], "b": []}
    while eng.has_unfinished():
        for out in eng.step():
            tokens[out.request_id] += out.token_ids
            if out.hidden is not None:
                assert len(out.hidden) == len(out.token_ids)
                hidden[out.request_id] += out.hidden
    assert hidden["b"] == [] and len(hidden["a"]) == 7
    reference = block_outputs(hf, PROMPTS["a"] + tokens["a"])
    for i, h in enumerate(hidden["a"]):
        assert h.dtype == torch.float16 and h.shape == (2, 64)
        for k, layer in enumerate([1, 0]):
            torch.testing.assert_close(h[k].float(), reference[layer][4 + i], atol=1e-2, rtol=1e-2)
