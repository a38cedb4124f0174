"""Prefix caching in the torch engine: the same greedy text with the cache as without, for
mixed batches (adapters, steering vectors), staggered joins, preemption and backtracking;
n = 4 prefills its prompt once. Tiny random checkpoint on CPU."""

from __future__ import annotations

import pytest
import torch

from models.engine.block_manager import BlockManager
from models.engine.config import EngineConfig
from models.engine.llm_engine import LLMEngine
from models.engine.sequence import Sequence
from models.engine.tiny_checkpoint import build_tiny_checkpoint
from models.protocol.requests import GenerationRequest, SamplingParams, SteerVectorSpec
from models.protocol.steering import (
    Backtrack,
    ForwardPass,
    RowActions,
    SteeringRequest,
    StepObserver,
)
from tests.engine.test_lora import make_adapter

SYSTEM = [(7 * i + 3) % 500 for i in range(23)]  # a shared "system prompt": 5 full blocks + 3


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build_tiny_checkpoint(tmp_path_factory.mktemp("prefix"), "qwen3", seed=4)


@pytest.fixture(scope="module")
def adapter(ckpt, tmp_path_factory):
    return make_adapter(ckpt, tmp_path_factory.mktemp("pc_adapter") / "alpha", seed=12)


def make_engine(ckpt, cache: bool, adapter=None, **config) -> LLMEngine:
    config = {"num_kv_blocks": 128, "block_size": 4, **config}
    eng = LLMEngine(EngineConfig(prefix_caching=cache, **config), ckpt)
    if adapter is not None:
        eng.adapters.load("alpha", str(adapter))
    eng.register_vector("v", torch.randn(2, 64, generator=torch.Generator().manual_seed(0)) * 3)
    return eng


def greedy(rid: str, prompt: list[int], max_tokens: int = 8, **kw) -> GenerationRequest:
    return GenerationRequest(
        rid, prompt, SamplingParams(max_tokens=max_tokens, temperature=0), **kw
    )


def run(
    eng: LLMEngine, requests: list[GenerationRequest], join_every: int = 0, logprobs=None
) -> dict:
    """Add the requests (one every `join_every` steps, or all at once), step until done;
    request id -> generated tokens (and their logprobs into `logprobs`, when given)."""
    got: dict[str, list[int]] = {}
    pending = list(requests)
    while pending or eng.has_unfinished():
        for _ in range(1 if join_every else len(pending)):
            if pending:
                eng.add_request(pending.pop(0))
        for _ in range(max(join_every, 1)):
            for out in eng.step():
                assert out.finish_reason != "error", out.error
                got.setdefault(out.request_id, []).extend(out.token_ids)
                if logprobs is not None:
                    lps = [lp.logprob for lp in out.logprobs or [] if lp is not None]
                    logprobs.setdefault(out.request_id, []).extend(lps)
    return got


def count_prefill(eng: LLMEngine) -> list[int]:
    """Wraps the runner so each step adds the prompt tokens it computed to the list."""
    counted, inner = [0], eng.runner.run

    def run_step(scheduled, *args):
        counted[0] += sum(
            min(item.num_tokens, item.seq.num_prompt_tokens - item.seq.num_computed)
            for item in scheduled
            if item.seq.num_computed < item.seq.num_prompt_tokens
        )
        return inner(scheduled, *args)

    eng.runner.run = run_step
    return counted


def mixed_requests() -> list[GenerationRequest]:
    """The same system prompt under different contents: base, adapter, a router mix, a
    steering vector, and a repeat of each (which the cache serves)."""
    tails = [[101, 102], [201, 202, 203, 204, 205], [301], [101, 102]]
    out = []
    for rep in range(2):
        for i, tail in enumerate(tails):
            kw = [{}, {"adapter": "alpha"}, {"adapter_weights": {"alpha": 0.5}},
                  {"steer_vectors": [SteerVectorSpec("v", 1.0)]}][i]  # fmt: skip
            out.append(greedy(f"{rep}-{i}", SYSTEM + tail, **kw))
    return out


def test_mixed_batch_with_staggered_joins_is_identical_with_the_cache(ckpt, adapter):
    reqs = mixed_requests()
    plain = run(make_engine(ckpt, False, adapter), reqs, join_every=2)
    eng = make_engine(ckpt, True, adapter, max_num_batched_tokens=16)  # chunked prefills too
    assert run(eng, reqs, join_every=2) == plain
    assert len({tuple(v) for v in plain.values()}) >= 3  # the contents really differ
    assert eng.stats().prefix_cache_hit_rate > 0.3
    assert eng.stats().free_blocks == eng.stats().total_blocks


def test_a_cached_prefix_is_not_shared_across_contents(ckpt, adapter):
    """The same prompt under another adapter / vector must not reuse the base model's K/V."""
    eng = make_engine(ckpt, True, adapter)
    first = run(eng, [greedy("base", SYSTEM)])
    hits = eng.blocks.hit_tokens
    other = [greedy("a", SYSTEM, adapter="alpha"),
             greedy("v", SYSTEM, steer_vectors=[SteerVectorSpec("v", 1.0)])]  # fmt: skip
    got = run(eng, other, join_every=3)
    assert eng.blocks.hit_tokens == hits  # nothing found for other contents
    assert got == run(make_engine(ckpt, False, adapter), other)
    assert run(eng, [greedy("again", SYSTEM)])["again"] == first["base"]
    assert eng.blocks.hit_tokens == hits + 20  # 5 full blocks of the 23-token prompt


def test_preemption_with_a_tiny_cache_is_identical(ckpt):
    reqs = [greedy(str(i), SYSTEM + [400 + i] * (i + 1), max_tokens=12) for i in range(5)]
    expected = run(make_engine(ckpt, False), reqs)
    small = {"num_kv_blocks": 20, "max_num_batched_tokens": 32}  # 19 usable for 5 x ~9 blocks
    eng = make_engine(ckpt, True, **small)
    assert run(eng, reqs, join_every=1) == expected
    assert eng.stats().preemptions > 0
    assert eng.blocks.hit_tokens > 0
    no_cache = make_engine(ckpt, False, **small)
    assert run(no_cache, reqs, join_every=1) == expected


def test_n4_prefills_the_prompt_once(ckpt):
    prompt = SYSTEM * 4  # 92 tokens: worth waiting a step for (WAIT_FOR_SIBLING_MIN_TOKENS)
    reqs = [
        GenerationRequest(f"n{i}", prompt, SamplingParams(max_tokens=6, seed=i)) for i in range(4)
    ]
    counts = {}
    outs = {}
    for cache in (False, True):
        eng = make_engine(ckpt, cache)
        counted = count_prefill(eng)
        outs[cache] = run(eng, reqs)
        counts[cache] = counted[0]
    assert counts[False] == 4 * len(prompt)
    assert counts[True] <= len(prompt) + 3 * 4  # the siblings compute only the last block
    assert outs[True] == outs[False]


class Rewind(StepObserver):
    """Backtracks row `rid` by `n` tokens once, at generated step `at`, forcing `forced`."""

    def __init__(self, rid: str, at: int, n: int, forced: list[int]):
        self.rid, self.at, self.n, self.forced, self.done = rid, at, n, forced, False

    def on_step(self, rows):
        out = []
        for row in rows:
            step = next(e.step for e in reversed(row.events) if isinstance(e, ForwardPass))
            act = row.request_id == self.rid and step == self.at and not self.done
            self.done = self.done or act
            out.append(
                RowActions(
                    row.request_id, [Backtrack(self.n, token_ids=self.forced)] if act else []
                )
            )
        return out


def test_backtrack_into_a_shared_block_copies_it(ckpt):
    """A's generated blocks are taken by B (whose prompt repeats them); A then rewinds into
    one of them and forces other tokens: A writes into its own copy (B's K/V stays), and both
    texts match a run without the cache."""
    prompt = SYSTEM[:8]
    gen = run(make_engine(ckpt, False), [greedy("g", prompt, max_tokens=12)])["g"]
    steering = SteeringRequest(policy="test", mode="sync", params={"max_backtrack": 8})
    a = greedy("A", prompt, max_tokens=12, steering=steering)
    b = greedy("B", prompt + gen[:6] + [499], max_tokens=6)
    b.params.logprobs = 0

    def go(cache: bool):
        eng = make_engine(ckpt, cache)
        eng.set_step_observer(Rewind("A", at=9, n=6, forced=[5, 6]))
        copies = []
        if cache:
            inner = eng.blocks.pool.copy_block
            eng.blocks.pool.copy_block = lambda s, d: (copies.append((s, d)), inner(s, d))
        eng.add_request(a)
        for _ in range(8):  # A has generated 7 tokens: blocks 0-2 hold prompt + gen[:4]
            eng.step()
        logprobs: dict = {}
        return run(eng, [b], logprobs=logprobs), logprobs["B"], copies, eng

    (got, b_logprobs, copies, eng), (expected, b_expected, _, _) = go(True), go(False)
    assert got == expected
    assert b_logprobs == pytest.approx(b_expected, abs=1e-4)  # B's K/V was not overwritten
    assert got["A"][:5] == gen[:3] + [5, 6]
    assert len(copies) == 1  # the rewound block (prompt + gen[:4]) was shared with B
    assert eng.stats().free_blocks == eng.stats().total_blocks


def test_steering_change_stops_caching_the_row(ckpt):
    eng = make_engine(ckpt, True)
    eng.add_request(greedy("s", SYSTEM, max_tokens=16))
    for _ in range(3):
        eng.step()
    cached = len(eng.blocks.pool.by_hash)
    eng.set_vector(eng.seqs["s"], "v", 2.0, None)
    run(eng, [])
    assert len(eng.blocks.pool.by_hash) == cached  # blocks computed after the change: private


def _seq(tokens: list[int]) -> Sequence:
    return Sequence(GenerationRequest("x", tokens), torch.Generator(), 0)


def test_unreferenced_cached_blocks_are_evicted_least_recently_freed_first():
    blocks = BlockManager(num_blocks=7, block_size=2, prefix_caching=True)  # 6 usable
    a, b = _seq([1, 2, 3, 4, 5]), _seq([9, 8, 7, 6, 5])
    for seq in (a, b):
        assert blocks.admit(seq, blocks.cached_prefix(seq), 5)
        seq.num_computed = 5
        blocks.release(seq)  # 2 full blocks each join the cache
    assert blocks.num_free == 6 and len(blocks.pool.by_hash) == 4
    c = _seq([11, 12, 13, 14, 15, 16, 17])  # 4 blocks: takes the 2 free, evicts a's 2
    assert blocks.admit(c, blocks.cached_prefix(c), 7)
    again_a, again_b = _seq([1, 2, 3, 4, 0]), _seq([9, 8, 7, 6, 0])
    assert blocks.cached_prefix(again_a) == []
    assert len(blocks.cached_prefix(again_b)) == 2
    assert not blocks.admit(again_a, [], 5)  # 2 left, 3 needed: refused, nothing changed
    assert blocks.num_free == 2 and c.num_computed == 0
