"""Hidden-state capture inside the decode CUDA graphs equals the capture without graphs (marked
gpu, skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch

from models.engine.config import EngineConfig
from models.engine.kernels.launch import HAS_TRITON
from models.engine.llm_engine import LLMEngine
from models.engine.tiny_checkpoint import build_tiny_checkpoint
from models.protocol.requests import GenerationRequest, SamplingParams, SteerVectorSpec
from models.protocol.steering import ForwardPass, RowActions, SteeringRequest, StepObserver

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not (torch.cuda.is_available() and HAS_TRITON), reason="needs CUDA and Triton"
    ),
]


class Recorder(StepObserver):
    """Keeps every ForwardPass.hidden a row's policy sees (a plumbing stand-in for a policy)."""

    def __init__(self):
        self.seen: dict[str, dict[int, torch.Tensor]] = {}

    def on_step(self, rows):
        for row in rows:
            for e in row.events:
                if isinstance(e, ForwardPass) and e.hidden is not None:
                    self.seen.setdefault(row.request_id, {})[e.step] = e.hidden.float().cpu()
        return [RowActions(row.request_id) for row in rows]


def capture(path, graphs: bool, layers: list[int], capture_layers: list[int]) -> dict:
    config = EngineConfig(device="cuda", dtype="float32", num_kv_blocks=256, block_size=4,
                          cuda_graphs=graphs, hidden_capture_layers=capture_layers)  # fmt: skip
    eng = LLMEngine(config, path)
    recorder = Recorder()
    eng.set_step_observer(recorder)
    torch.manual_seed(0)
    eng.register_vector("v", torch.randn(4, 128) * 3)
    g = torch.Generator().manual_seed(0)
    for i, n in enumerate((3, 17, 9, 30, 5)):
        prompt = torch.randint(0, 512, (n,), generator=g).tolist()
        steering = SteeringRequest("r", {"hidden_layers": layers}, mode="colocated")
        eng.add_request(GenerationRequest(
            f"r{i}", prompt, SamplingParams(max_tokens=10, temperature=0),
            steer_vectors=[SteerVectorSpec("v", 1.0)] if i % 2 else [],
            steering=steering if i != 2 else None,
        ))  # fmt: skip
    tokens: dict[str, list[int]] = {}
    while eng.has_unfinished():
        for out in eng.step():
            tokens.setdefault(out.request_id, []).extend(out.token_ids)
    return recorder.seen, tokens


@pytest.mark.parametrize("layers", [[1, 3], [0]])  # inside the captured set; outside: no graphs
def test_graph_capture_equals_eager_capture(tmp_path, layers):
    shape = dict(hidden_size=128, head_dim=32, num_attention_heads=4, num_key_value_heads=2)
    path = build_tiny_checkpoint(tmp_path, "qwen3", num_hidden_layers=4, **shape)
    eager, eager_tokens = capture(path, False, layers, [])
    graphed, graphed_tokens = capture(path, True, layers, [1, 2, 3])
    assert graphed_tokens == eager_tokens  # r2 reads nothing: its tokens are those of every run
    assert eager.keys() == graphed.keys() and len(eager) == 4
    for rid, steps in eager.items():
        assert steps.keys() == graphed[rid].keys() and len(steps) == 10
        for step, want in steps.items():
            assert want.shape == (len(layers), 128)
            torch.testing.assert_close(graphed[rid][step], want, atol=1e-4, rtol=1e-4)
