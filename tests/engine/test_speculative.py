"""Speculative decoding in the torch engine: greedy text identical with and without it (mixed
batches, staggered joins, adapters, the prefix cache, a tiny cache that preempts), rows with a
steering policy not speculated and told so, and rejection sampling keeping the big model's
distribution (chi-square on a small vocabulary)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from scipy.stats import chisquare

from models.engine.config import EngineConfig
from models.engine.llm_engine import LLMEngine
from models.engine.sequence import Sequence
from models.engine.speculative import Speculator
from models.engine.tiny_checkpoint import build_tiny_checkpoint
from models.protocol.drafter import Draft
from models.protocol.outputs import SpeculationStats
from models.protocol.requests import GenerationRequest, SamplingParams, SteerVectorSpec
from models.protocol.steering import SteeringRequest, StepObserver
from models.steering.drafter import SmallModelDrafter
from models.steering.paged_small_model import PagedSmallModel
from tests.engine.test_lora import make_adapter
from tests.engine.test_prefix_cache import run


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    return build_tiny_checkpoint(tmp_path_factory.mktemp("spec_big"), "qwen3", seed=5)


@pytest.fixture(scope="module")
def other(tmp_path_factory):
    """Another random model of the same vocabulary: its drafts are mostly rejected."""
    return build_tiny_checkpoint(tmp_path_factory.mktemp("spec_other"), "qwen3", seed=6)


def make_engine(path, drafter_path=None, k: int = 4, **config) -> LLMEngine:
    config = {"num_kv_blocks": 128, "block_size": 4, "speculative": {"k": k}, **config}
    eng = LLMEngine(EngineConfig(**config), path)
    if drafter_path is not None:
        small = PagedSmallModel(str(drafter_path), device="cpu", kv_cache_gib=0.01, block_size=4)
        eng.set_drafter(SmallModelDrafter(small))
    return eng


def prompts(n: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(3, 512, (5 + 7 * i,), generator=g).tolist() for i in range(n)]


def greedy_requests(n: int = 4, max_tokens: int = 14, **kw) -> list[GenerationRequest]:
    return [
        GenerationRequest(f"g{i}", p, SamplingParams(max_tokens=max_tokens, temperature=0), **kw)
        for i, p in enumerate(prompts(n))
    ]


@pytest.mark.parametrize("drafter", ["same", "other"])
def test_greedy_is_identical_with_speculation(big, other, drafter):
    reqs = greedy_requests()
    reqs[1].params.logit_bias = {7: 5.0}  # applied to every verified position too
    reqs[2].speculative_k = 0  # this row alone decodes one token per step
    reqs[3].speculative_k = 2
    plain = [replace(r, speculative_k=None) for r in reqs]  # no drafter: no k may be asked
    expected = run(make_engine(big), plain, join_every=2)
    eng = make_engine(big, big if drafter == "same" else other)
    assert run(eng, reqs, join_every=2) == expected
    spec = eng.speculator
    assert spec.num_proposed > 0
    if drafter == "same":  # the big model drafting for itself: nearly everything is kept
        assert spec.num_accepted > 0.8 * spec.num_proposed
    assert eng.stats().free_blocks == eng.stats().total_blocks


def test_speculation_with_prefix_cache_and_preemption_is_identical(big):
    reqs = greedy_requests(5, max_tokens=12)
    small = {"num_kv_blocks": 24, "max_num_batched_tokens": 32}
    expected = run(make_engine(big, **small), reqs, join_every=1)
    eng = make_engine(big, big, **small)
    assert run(eng, reqs, join_every=1) == expected
    assert eng.stats().preemptions > 0 and eng.speculator.num_accepted > 0


def test_lora_rows_draft_with_the_small_models_adapter_of_the_same_name(big, tmp_path):
    """The drafter is the big checkpoint itself: with the row's adapter it proposes what the
    big model picks; without one (no adapter of that name) it drafts with the base and is
    mostly wrong. The text is the adapter's either way."""
    lora = str(make_adapter(big, tmp_path / "alpha", seed=10))
    reqs = greedy_requests(2, max_tokens=12, adapter="alpha")
    plain = make_engine(big)
    plain.adapters.load("alpha", lora)
    expected = run(plain, reqs)
    rates = []
    for small_adapters in ({"alpha": lora}, {}):
        eng = make_engine(big)
        eng.adapters.load("alpha", lora)
        small = PagedSmallModel(str(big), small_adapters, device="cpu", kv_cache_gib=0.01,
                                block_size=4)  # fmt: skip
        eng.set_drafter(SmallModelDrafter(small))
        assert run(eng, reqs) == expected
        rates.append(eng.speculator.num_accepted / eng.speculator.num_proposed)
    assert rates[0] > 0.8 > rates[1], rates


def test_rows_with_static_steering_vectors_are_speculated_and_identical(big):
    """A steering vector applies at every verified position, as at a decoded one."""
    reqs = greedy_requests(3, max_tokens=10)
    for r in reqs[:2]:
        r.steer_vectors = [SteerVectorSpec("v", 4.0)]
    plain, spec = make_engine(big), make_engine(big, big)
    shape = (plain.args.num_layers, plain.args.hidden_size)
    vector = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    for eng in (plain, spec):
        eng.register_vector("v", vector)
    expected = run(plain, reqs)
    unsteered = run(make_engine(big), [replace(r, steer_vectors=[]) for r in reqs[:1]])
    assert expected["g0"] != unsteered["g0"]  # the vector matters
    assert run(spec, reqs) == expected
    assert spec.speculator.num_accepted > 0


class Quiet(StepObserver):
    """A steering policy that never acts (plumbing: only its presence matters here)."""

    def on_step(self, rows):
        return []


def test_a_row_with_a_steering_policy_is_not_speculated_and_says_so(big):
    eng = make_engine(big, big)
    eng.set_step_observer(Quiet())
    steered = GenerationRequest(
        "s", prompts(1)[0], SamplingParams(max_tokens=8, temperature=0),
        steering=SteeringRequest(policy="test", mode="sync"),
    )  # fmt: skip
    eng.add_request(steered)
    outs = []
    while eng.has_unfinished():
        outs += eng.step()
    notes = [i for o in outs for i in o.interventions if i.action == "speculation_off"]
    assert len(notes) == 1 and "steering" in notes[0].detail["reason"]
    assert eng.speculator.num_proposed == 0
    assert sum(len(o.token_ids) for o in outs) == 8


def test_sampled_rows_with_speculation_finish_with_their_lengths(big, other):
    eng = make_engine(big, other)
    reqs = [
        GenerationRequest(f"s{i}", p, SamplingParams(max_tokens=10, seed=i, top_k=50, logprobs=2))
        for i, p in enumerate(prompts(3))
    ]
    got = run(eng, reqs)
    assert all(len(v) == 10 for v in got.values())
    assert eng.speculator.num_proposed > 0


class FixedDrafter:
    """Plumbing for the chi-square test: draws proposals from a fixed distribution q."""

    vocab_size = 8

    def propose(self, rows, k):
        raise NotImplementedError

    def release(self, request_ids):
        pass


@pytest.mark.parametrize("temperature,top_k", [(1.0, 0), (0.7, 5)])
def test_rejection_sampling_keeps_the_big_models_distribution(temperature, top_k):
    """First token of a verified row over many trials ~ the big model's sampling distribution,
    although the drafts come from a very different q."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 8, generator=g) * 1.5  # big model: positions 0..2 (k = 2)
    q = torch.softmax(torch.randn(2, 8, generator=g) * 2, -1)  # drafter
    spec = Speculator(FixedDrafter(), 2, 8, max_model_len=64)
    params = SamplingParams(max_tokens=4, temperature=temperature, top_k=top_k)
    seq = Sequence(GenerationRequest("c", [1, 2, 3], params), torch.Generator().manual_seed(1), 0)
    seq.speculation = SpeculationStats(2)
    trials, counts, kept = 3000, torch.zeros(8), 0
    for _ in range(trials):
        drafts = torch.multinomial(q, 1, generator=g).flatten().tolist()
        spec.pending[seq] = Draft(drafts, q)
        seq.token_ids = [1, 2, 3] + drafts
        tokens = [t for t, _ in spec.accept(seq, logits)]
        counts[tokens[0]] += 1
        kept += len(tokens) - 1
    scaled = logits[0] / temperature
    if top_k:
        scaled[scaled < scaled.topk(top_k).values[-1]] = float("-inf")
    p = scaled.softmax(-1)
    support = p > 0
    assert counts[~support].sum() == 0
    stat = chisquare(counts[support].numpy(), (p[support] * trials).numpy())
    assert stat.pvalue > 1e-3, (counts, p * trials)
    assert 0 < kept < 2 * trials  # some drafts kept, some rejected


class BrokenDrafter:
    """Plumbing: a drafter that always raises (e.g. a prompt longer than the small model reads)."""

    vocab_size = 512

    def propose(self, rows, k):
        raise ValueError("the small model reads at most 8 tokens")

    def release(self, request_ids):
        pass


def test_a_failing_drafter_only_turns_speculation_off(big):
    reqs = greedy_requests(2, max_tokens=6)
    expected = run(make_engine(big), reqs)
    eng = make_engine(big)
    eng.set_drafter(BrokenDrafter())
    assert run(eng, reqs) == expected
