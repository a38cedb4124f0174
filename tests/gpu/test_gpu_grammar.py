"""Grammar masks on a CUDA GPU: constrained rows replay the decode CUDA graph (the mask is
applied to its logits outside the graph) beside free rows, and their JSON parses."""

from __future__ import annotations

import json

import pytest

from models.builtin import resolve_source
from models.engine.config import EngineConfig
from models.engine.llm_engine import LLMEngine
from models.protocol.constraints import OutputConstraint
from models.protocol.requests import GenerationRequest, SamplingParams

pytestmark = pytest.mark.gpu

SCHEMA = OutputConstraint("json_schema", json.dumps({
    "type": "object", "additionalProperties": False, "required": ["who", "n"],
    "properties": {"who": {"type": "string", "maxLength": 12}, "n": {"type": "integer"}}}))


def test_constrained_rows_parse_with_cuda_graphs():
    eng = LLMEngine(EngineConfig(device="cuda", num_kv_blocks=256), resolve_source("builtin:toy").big)
    assert eng.runner.graphs is not None, "decode steps should replay CUDA graphs"
    prompt = eng.tokenizer.encode("Where is Mia?")
    for i in range(12):
        eng.add_request(GenerationRequest(
            f"r{i}", prompt, SamplingParams(max_tokens=48, temperature=1.0, seed=i),
            constraint=SCHEMA if i % 2 == 0 else None))
    texts: dict[str, str] = {}
    while eng.has_unfinished():
        for out in eng.step():
            texts[out.request_id] = texts.get(out.request_id, "") + out.text
    for i in range(0, 12, 2):
        assert set(json.loads(texts[f"r{i}"])) == {"who", "n"}
    assert eng.constraints.mask_rows > 0
