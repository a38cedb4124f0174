"""The torch engine on CUDA: Triton kernels and CUDA-graph decode against transformers and
against the same engine without graphs (marked gpu, skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch

from models.engine.config import EngineConfig
from models.engine.kernels.launch import HAS_TRITON
from models.engine.llm_engine import LLMEngine
from models.engine.tiny_checkpoint import build_tiny_checkpoint
from models.protocol.requests import GenerationRequest, SamplingParams, SteerVectorSpec

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not (torch.cuda.is_available() and HAS_TRITON), reason="needs CUDA and Triton"
    ),
]

PROMPT_LENGTHS = (3, 17, 9, 30, 5)
SHAPE = dict(hidden_size=128, head_dim=32, num_attention_heads=4, num_key_value_heads=2)


def prompts(seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 512, (k,), generator=g).tolist() for k in PROMPT_LENGTHS]


def engine(path, **config) -> LLMEngine:
    config = dict(device="cuda", dtype="float32", num_kv_blocks=256, block_size=4, **config)
    return LLMEngine(EngineConfig(**config), path)


def run_all(eng: LLMEngine, requests: list[GenerationRequest]) -> dict[str, list[int]]:
    for request in requests:
        eng.add_request(request)
    tokens: dict[str, list[int]] = {r.request_id: [] for r in requests}
    while eng.has_unfinished():
        for out in eng.step():
            tokens[out.request_id].extend(out.token_ids)
    return tokens


def greedy(i: int, prompt: list[int], n: int = 12, **extra) -> GenerationRequest:
    params = SamplingParams(max_tokens=n, temperature=0)
    return GenerationRequest(f"r{i}", prompt, params, **extra)


@pytest.mark.parametrize("model_type", ["qwen3", "llama"])
def test_graph_decode_matches_transformers_greedy(tmp_path, model_type):
    from transformers import AutoModelForCausalLM

    path = build_tiny_checkpoint(tmp_path / model_type, model_type, **SHAPE)
    hf = AutoModelForCausalLM.from_pretrained(str(path)).eval()
    eng = engine(path)
    assert eng.runner.graphs is not None, "decode graphs were not captured on CUDA"
    got = run_all(eng, [greedy(i, p) for i, p in enumerate(prompts())])
    for i, prompt in enumerate(prompts()):
        want = hf.generate(
            torch.tensor([prompt]), max_new_tokens=12, min_new_tokens=12, do_sample=False
        )
        assert got[f"r{i}"] == want[0, len(prompt) :].tolist(), f"prompt {i}"


def test_graphs_agree_with_eager_decode_under_steering_and_lora(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    path = build_tiny_checkpoint(tmp_path / "m", "qwen3", **SHAPE)
    hf = AutoModelForCausalLM.from_pretrained(str(path))
    lora = get_peft_model(
        hf,
        LoraConfig(r=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False),
    )
    lora.save_pretrained(str(tmp_path / "adapter"))
    vector = torch.randn(2, SHAPE["hidden_size"], generator=torch.Generator().manual_seed(3))
    results = []
    for graphs in (True, False):
        eng = engine(path, cuda_graphs=graphs)
        assert (eng.runner.graphs is not None) == graphs
        eng.adapters.load("styled", str(tmp_path / "adapter"))
        eng.register_vector("push", vector)
        p = prompts()
        steer = [SteerVectorSpec("push", 4.0, [1])]
        requests = [
            greedy(0, p[0]),
            greedy(1, p[0], steer_vectors=steer),
            greedy(2, p[0], adapter="styled"),
            greedy(3, p[1]),
            # finishes early: the rows' stacked deltas change mid-run (the graph's steer
            # buffer is refreshed, not reused)
            greedy(4, p[1], n=5, steer_vectors=[SteerVectorSpec("push", -3.0, [0, 1])]),
        ]
        results.append(run_all(eng, requests))
    with_graphs, eager = results
    assert with_graphs == eager
    assert with_graphs["r1"] != with_graphs["r0"], "steering did not change the text"
    assert with_graphs["r2"] != with_graphs["r0"], "the adapter did not change the text"


def test_to_device_copies_host_data_once_and_leaves_gpu_tensors_alone():
    from models.engine.device import to_device

    on_gpu = torch.arange(6.0, device="cuda")
    same = to_device(on_gpu, torch.float32, torch.device("cuda"))  # no index: the current GPU
    assert same.data_ptr() == on_gpu.data_ptr()
    flat = to_device([3, 1, 2], torch.int64, torch.device("cuda"))  # through a numpy view
    nested = to_device([[1.5, 2.0], [0.0, -1.0]], torch.bfloat16, torch.device("cuda"))
    assert flat.tolist() == [3, 1, 2] and flat.dtype == torch.int64
    assert nested.tolist() == [[1.5, 2.0], [0.0, -1.0]] and nested.dtype == torch.bfloat16


def test_staged_inputs_hold_what_each_write_queued():
    from models.engine.cuda_graph import StagedInputs

    staged = StagedInputs(rows=8, max_blocks=4, device=torch.device("cuda"))
    b = staged.buffers
    for ids, positions, tables, width in (
        ([7, 8, 9], [4, 9, 2], [1, 2, 3, 4, 0, 5], 2),
        ([6], [30], [9, 8, 7, 6], 4),  # the other mirror; fewer rows than before
    ):
        n = len(ids)
        slots = [p * 10 for p in positions]
        staged.write(4, ids, positions, slots, tables, width)
        torch.cuda.synchronize()
        assert b["ids"][:4].tolist() == ids + [0] * (4 - n)  # padded to the bucket
        assert b["pos"][:n].tolist() == positions and b["slots"][:4].tolist()[:n] == slots
        assert b["ctx"][:4].tolist() == [p + 1 for p in positions] + [0] * (4 - n)
        assert b["slots"][n:4].tolist() == [0] * (4 - n)  # pad rows write the null slot
        assert b["tables"][:n, :width].flatten().tolist() == tables


def test_loading_goes_straight_to_bf16_on_the_gpu(tmp_path):
    """Peak GPU memory while loading stays within 1.1x the bf16 weight bytes (no float32 pass,
    one tensor for a tied embedding and output head)."""
    from models.engine.llama import load_llama

    path = build_tiny_checkpoint(
        tmp_path / "m", "qwen3", vocab_size=32000, hidden_size=1024, intermediate_size=3072,
        num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4, head_dim=128,
    )  # fmt: skip
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    model = load_llama(path, torch.device("cuda"), torch.bfloat16, max_len=512)
    peak = torch.cuda.max_memory_allocated() - base
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert model.lm_head.data_ptr() == model.embed_tokens.weight.data_ptr()
    assert peak <= 1.1 * weight_bytes, f"peak {peak / 2**20:.0f} MiB for {weight_bytes / 2**20:.0f}"
