"""Grammar masks inside the engine step (built-in toy model): the bitmask op against a plain
reference, constrained rows beside a LoRA adapter and a steering vector in one batch, a
backtrack that rolls the grammar back, and a grammar the row cannot leave."""

from __future__ import annotations

import json

import pytest
import torch

from models.builtin import resolve_source
from models.engine.config import EngineConfig
from models.engine.constraints import apply_bitmask
from models.engine.llm_engine import LLMEngine
from models.protocol.constraints import OutputConstraint
from models.protocol.requests import GenerationRequest, SamplingParams, SteerVectorSpec

SCHEMA = OutputConstraint("json_schema", json.dumps({
    "type": "object", "additionalProperties": False, "required": ["who", "n"],
    "properties": {"who": {"type": "string", "maxLength": 12}, "n": {"type": "integer"}}}))


@pytest.fixture(scope="module")
def toy():
    paths = resolve_source("builtin:toy")
    eng = LLMEngine(EngineConfig(num_kv_blocks=256, block_size=16), paths.big)
    eng.adapters.load("qa", str(paths.adapters["qa"]))
    eng.register_vector("up", torch.randn(eng.args.num_layers, eng.args.hidden_size))
    return eng


def run(eng: LLMEngine, requests: list[GenerationRequest]) -> dict[str, tuple[str, str]]:
    for r in requests:
        eng.add_request(r)
    texts: dict[str, str] = {}
    reasons: dict[str, str] = {}
    while eng.has_unfinished():
        for out in eng.step():
            texts[out.request_id] = texts.get(out.request_id, "") + out.text
            if out.finished:
                reasons[out.request_id] = out.finish_reason
    return {k: (texts[k], reasons[k]) for k in texts}


def test_apply_bitmask_matches_a_plain_reference():
    torch.manual_seed(0)
    logits, vocab = torch.randn(3, 70), 70
    allowed = torch.rand(3, vocab) > 0.5
    bitmask = torch.zeros(3, 3, dtype=torch.int64)
    for r in range(3):
        for t in range(vocab):
            bitmask[r, t // 32] |= int(allowed[r, t]) << (t % 32)
    bitmask = torch.where(bitmask >= 2**31, bitmask - 2**32, bitmask).to(torch.int32)
    got = apply_bitmask(logits, bitmask)
    assert torch.equal(got, logits.masked_fill(~allowed, float("-inf")))


def test_constrained_rows_parse_beside_lora_steering_and_free_rows(toy):
    prompt = toy.tokenizer.encode("Where is Mia?")
    params = dict(max_tokens=48, temperature=1.0)
    reqs = [GenerationRequest(f"c{i}", prompt, SamplingParams(seed=i, **params), constraint=SCHEMA,
                              adapter="qa" if i % 3 == 1 else None,
                              steer_vectors=[SteerVectorSpec("up", 4.0)] if i % 3 == 2 else [])
            for i in range(9)]  # fmt: skip
    reqs.append(GenerationRequest("free", prompt, SamplingParams(seed=0, **params)))
    out = run(toy, reqs)
    for i in range(9):
        text, reason = out[f"c{i}"]
        assert reason == "stop" and set(json.loads(text)) == {"who", "n"}, text
    assert not out["free"][0].startswith('{"who"')


def test_backtrack_rolls_the_grammar_back(toy):
    prompt = toy.tokenizer.encode("Where is Mia?")
    toy.add_request(GenerationRequest("b", prompt, SamplingParams(max_tokens=40, temperature=0),
                                      constraint=SCHEMA))  # fmt: skip
    seq = toy.seqs["b"]
    while seq.num_generated < 6:
        toy.step()
    seq.num_sent_tokens = seq.num_sent_chars = 0  # held back, as a steered row's tail is
    toy.backtrack(seq, 4)
    text = ""
    while toy.has_unfinished():
        text += "".join(o.text for o in toy.step())
    assert set(json.loads(text)) == {"who", "n"}


def test_forced_tokens_outside_the_grammar_end_the_row_with_an_error(toy):
    prompt = toy.tokenizer.encode("Where is Mia?")
    toy.add_request(GenerationRequest("f", prompt, SamplingParams(max_tokens=20),
                                      constraint=SCHEMA))  # fmt: skip
    toy.force_tokens(toy.seqs["f"], toy.tokenizer.encode("Mia"))
    outs = []
    while toy.has_unfinished():
        outs += toy.step()
    assert outs[-1].finish_reason == "error" and "grammar" in outs[-1].error


def test_a_mask_filled_during_the_forward_is_used_unless_the_grammar_moved(toy, monkeypatch):
    """`prepare` fills a row's mask while the forward runs; `apply` takes it as is, and fills
    the row again when its grammar moved in between (a backtrack)."""
    toy.add_request(GenerationRequest("p", toy.tokenizer.encode("Where is Mia?"),
                                      SamplingParams(max_tokens=40, temperature=0),
                                      constraint=SCHEMA))  # fmt: skip
    seq = toy.seqs["p"]
    while seq.num_generated < 4:
        toy.step()
    rows = toy.constraints
    monkeypatch.setattr(rows, "fill_during_forward", True)
    compiler = rows.compiler()
    fills = []
    fill = compiler.fill_bitmask
    monkeypatch.setattr(compiler, "fill_bitmask", lambda r, bm: (fills.append(len(r)), fill(r, bm)))
    logits = torch.zeros(1, toy.args.vocab_size)
    fresh = rows.apply(logits, [seq])
    rows.prepare([seq])
    assert torch.equal(rows.apply(logits, [seq]), fresh) and fills == [1, 1]  # no third fill
    rows.prepare([seq])
    rows.rollback(seq, 3)
    moved = rows.apply(logits, [seq])
    assert fills == [1, 1, 1, 1]  # filled again after the backtrack
    assert torch.equal(moved, rows.apply(logits, [seq]))  # as a fill without prepare
    toy.abort("p")
    while toy.has_unfinished():
        toy.step()
