"""SteeringRuntime on the built-in tiny models: actions against the formulas computed by hand,
one batched small-model forward per step, resync, errors, user policies, the legality table."""

from __future__ import annotations

import asyncio
import shutil

import pytest
import torch

from models.builtin import resolve_source
from models.engine.steering_hooks import apply_adjustments
from models.protocol.steering import (
    Added,
    AdjustedLogits,
    Backtrack,
    ForceTokens,
    ForwardPass,
    IllegalActionError,
    Prefilled,
    RowActions,
    RowEvents,
    Sampled,
    SteerVector,
    check_action,
)
from models.steering.config import SteeringConfig
from models.steering.policies import Policy, TokenizerMismatchError
from models.steering.policies.base import LogitPolicy
from models.steering.runtime import SteeringRuntime

HAPPY = ["the cat is happy and glad", "a happy song"]
SAD = ["the cat is sad and gloomy", "a sad song"]


class ForceFirstToken(Policy):
    """A user policy (loaded by import path): force token 7 right after the prompt."""

    def on_event(self, state, event):
        return [ForceTokens([7])] if isinstance(event, Prefilled) else []


class IllegalBacktrack(Policy):
    """A user policy that answers Prefilled with Backtrack, which the table forbids."""

    def on_event(self, state, event):
        return [Backtrack(1)]


class Exploding(Policy):
    def on_event(self, state, event):
        raise RuntimeError("policy blew up")


class FailsOnBadRows(Policy):
    """A user policy that raises on rows whose id starts with 'bad' (forces 7 on the rest)."""

    def on_event(self, state, event):
        if state.request_id.startswith("bad"):
            raise RuntimeError(f"cannot steer {state.request_id}")
        return [ForceTokens([7])] if isinstance(event, Prefilled) else []


class BatchFailsOnBadRows(LogitPolicy):
    """A logit policy whose batched math raises when a 'bad' row is in the batch."""

    def deltas(self, states):
        if any(s.request_id.startswith("bad") for s in states):
            raise RuntimeError("batch has a bad row")
        return torch.ones(len(states), self.context.big_vocab_size)


CONFIG = {
    "expert_adapter": "positive",
    "vectors": [{"name": "happy", "positive": HAPPY, "negative": SAD}],
    "policies": [
        {"name": "proxy", "kind": "proxy_tuning", "params": {"alpha": 0.7}},
        {"name": "contrast", "kind": "contrastive", "params": {"beta": 0.4}},
        {"name": "guard", "kind": "vector_guard",
         "params": {"vector": "happy", "coeff": 3.0, "threshold": 0.5, "backtrack": 2,
                    "positive": HAPPY[:1], "negative": SAD[:1]}},
        {"name": "force", "kind": f"{__name__}:ForceFirstToken"},
        {"name": "illegal", "kind": f"{__name__}:IllegalBacktrack"},
        {"name": "explode", "kind": f"{__name__}:Exploding"},
        {"name": "picky", "kind": f"{__name__}:FailsOnBadRows"},
        {"name": "picky_batch", "kind": f"{__name__}:BatchFailsOnBadRows"},
    ],
}  # fmt: skip


@pytest.fixture(scope="module")
def tiny():
    return resolve_source("builtin:tiny")


@pytest.fixture(scope="module", params=["engine", "transformers"])
def runtime(request):
    """The runtime with the small model on the engine's paged runner, or on transformers."""
    config = SteeringConfig.model_validate({**CONFIG, "small_model_runner": request.param})
    return SteeringRuntime.from_source(config, "builtin:tiny")


@pytest.fixture(scope="module")
def reference(tiny):
    """The small model and its expert, plainly: full-sequence forwards, no cache."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(tiny.small, dtype=torch.float32).eval()
    expert = AutoModelForCausalLM.from_pretrained(tiny.small, dtype=torch.float32)
    expert = PeftModel.from_pretrained(expert, tiny.small_adapters["positive"]).eval()
    tok = AutoTokenizer.from_pretrained(tiny.small)

    @torch.no_grad()
    def logits(model, ids):
        return model(torch.tensor([ids])).logits[0, -1]

    return base, expert, tok, logits


def run(runtime, rows):
    return {a.request_id: a for a in asyncio.run(runtime.process(rows))}


def only_logits(answer) -> AdjustedLogits:
    assert answer.error is None and not answer.resync, answer
    (action,) = answer.actions
    assert isinstance(action, AdjustedLogits)
    return action


def test_batched_adjustments_equal_the_per_row_formula():
    """apply_adjustments (one add and one softmax for all rows) against each row done plainly:
    replacement logits, deltas, the plausibility head, and untouched rows, mixed."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 50, generator=g) * 3
    deltas = torch.randn(5, 50, generator=g)  # the rows' deltas: views of one tensor
    actions = [
        AdjustedLogits(0, delta=deltas[0]),
        None,
        AdjustedLogits(0, delta=deltas[2], plausibility_alpha=0.3),
        AdjustedLogits(0, logits=torch.randn(50, generator=g), delta=deltas[3]),
        AdjustedLogits(0, plausibility_alpha=0.05),
    ]
    want = logits.clone()
    for i, action in enumerate(actions):
        if action is None:
            continue
        row = action.logits if action.logits is not None else logits[i]
        if action.delta is not None:
            row = row + action.delta
        if action.plausibility_alpha is not None:
            probs = logits[i].softmax(-1)
            row = row.masked_fill(probs < action.plausibility_alpha * probs.max(), float("-inf"))
        want[i] = row
    got = apply_adjustments(logits.clone(), actions)
    torch.testing.assert_close(got, want)
    assert torch.isinf(got[2]).any() and not torch.isinf(got[0]).any()
    every = [AdjustedLogits(0, delta=d) for d in deltas]  # all rows: no index, one add
    torch.testing.assert_close(apply_adjustments(logits, every), logits + deltas)
    assert apply_adjustments(logits, [None] * 5) is logits


def test_answers_that_leave_the_process_do_not_drag_the_batch():
    import pickle

    batch = torch.randn(16, 10_000)
    answer = RowActions("r", [AdjustedLogits(0, delta=batch[3]), SteerVector("v", 1.0)])
    assert len(pickle.dumps(answer)) > batch.nbytes  # a view pickles its whole storage
    owned = answer.owning_tensors()
    assert len(pickle.dumps(owned)) < batch.nbytes / 8
    torch.testing.assert_close(owned.actions[0].delta, batch[3])


def test_illegal_action_names_both():
    with pytest.raises(IllegalActionError, match=r"Backtrack is not allowed after event Prefilled"):
        check_action(Prefilled([1, 2]), Backtrack(1))
    check_action(Sampled(3, 5), Backtrack(1))


def test_proxy_tuning_and_contrastive_follow_the_formulas(runtime, reference):
    """Two requests of different lengths and policies share each step's one forward."""
    base, expert, _, logits = reference
    prompts = {"p": [5, 9, 12, 40, 41], "c": [7, 8, 9]}
    tokens = {k: list(v) for k, v in prompts.items()}
    reads = runtime.stats().small_model_reads
    answers = run(
        runtime,
        [
            RowEvents("p", [Prefilled(prompts["p"]), ForwardPass(0)], "proxy", {}, 5),
            RowEvents("c", [Prefilled(prompts["c"]), ForwardPass(0)], "contrast", {}, 3),
        ],
    )
    for step in range(4):
        p, c = only_logits(answers["p"]), only_logits(answers["c"])
        assert p.step == c.step == step
        want_p = 0.7 * (logits(expert, tokens["p"]) - logits(base, tokens["p"]))
        torch.testing.assert_close(p.delta, want_p, atol=1e-4, rtol=1e-4)
        assert p.delta.abs().max() > 1e-3  # the expert really differs from the base
        torch.testing.assert_close(c.delta, -0.4 * logits(base, tokens["c"]), atol=1e-4, rtol=1e-4)
        assert c.plausibility_alpha == 0.1 and p.plausibility_alpha is None
        greedy = {k: int(logits(base, v).argmax()) for k, v in tokens.items()}
        for k in tokens:
            tokens[k].append(greedy[k])
        answers = run(
            runtime,
            [
                RowEvents("p", [Sampled(step, greedy["p"]), ForwardPass(step + 1)], "proxy"),
                RowEvents("c", [Sampled(step, greedy["c"]), ForwardPass(step + 1)], "contrast"),
            ],
        )
    assert runtime.stats().small_model_reads == reads + 5  # one forward per step for both rows
    runtime.release(["p", "c"])
    assert "p" not in runtime.states


def test_request_params_override_config_and_are_validated(runtime, reference):
    base, _, _, logits = reference
    answers = run(runtime, [RowEvents("b", [Prefilled([3, 4]), ForwardPass(0)], "contrast",
                                      {"beta": 2.0, "plausibility_alpha": 0.5})])  # fmt: skip
    action = only_logits(answers["b"])
    torch.testing.assert_close(action.delta, -2.0 * logits(base, [3, 4]), atol=1e-4, rtol=1e-4)
    assert action.plausibility_alpha == 0.5
    bad = run(runtime, [RowEvents("x", [Prefilled([3])], "contrast", {"gamma": 1})])["x"]
    assert "gamma" in bad.error and not bad.actions
    runtime.release(["b", "x"])


def test_resync_and_backtrack_rebuild_the_state(runtime, reference):
    base, expert, _, logits = reference
    # a replica that never saw the request asks for its tokens
    lost = run(runtime, [RowEvents("r", [Sampled(4, 11), ForwardPass(5)], "proxy")])["r"]
    assert lost.resync and not lost.actions
    # the engine resends the whole sequence: 3 prompt + 5 generated tokens
    seq = [5, 6, 7, 20, 21, 22, 23, 11]
    answer = run(runtime, [RowEvents("r", [ForwardPass(5)], "proxy", {}, 3, token_ids=seq)])["r"]
    want = 0.7 * (logits(expert, seq) - logits(base, seq))
    torch.testing.assert_close(only_logits(answer).delta, want, atol=1e-4, rtol=1e-4)
    # a backtrack of two tokens, then a different token at step 3
    answer = run(runtime, [RowEvents("r", [Added(3, [30]), ForwardPass(4)], "proxy")])["r"]
    seq = [5, 6, 7, 20, 21, 22, 30]
    action = only_logits(answer)
    assert action.step == 4
    want = 0.7 * (logits(expert, seq) - logits(base, seq))
    torch.testing.assert_close(action.delta, want, atol=1e-4, rtol=1e-4)
    # tokens that were never reported: the state is dropped and a resync asked for
    gap = run(runtime, [RowEvents("r", [Sampled(9, 3), ForwardPass(10)], "proxy")])["r"]
    assert gap.resync and "r" not in runtime.states


def test_vector_guard_turns_the_vector_on_when_the_concept_shows(runtime, reference):
    *_, tok, _ = reference
    happy, sad = tok(HAPPY[0]).input_ids, tok(SAD[0]).input_ids
    answers = run(runtime, [RowEvents("h", [Prefilled(happy), ForwardPass(0)], "guard"),
                            RowEvents("s", [Prefilled(sad), ForwardPass(0)], "guard")])  # fmt: skip
    # on the prompt itself: vector on, but no backtrack (nothing generated yet)
    assert answers["h"].actions == [SteerVector("happy", 3.0, None)]
    assert answers["s"].actions == []
    assert runtime.states["h"].scratch["score"] == pytest.approx(1.0, abs=1e-3)
    assert runtime.states["s"].scratch["score"] == pytest.approx(-1.0, abs=1e-3)
    # the sad text turns happy while generating: vector on, and the last 2 tokens taken back
    prompt = tok("the cat is").input_ids
    rest = happy[len(prompt) :]
    assert happy[: len(prompt)] == prompt and len(rest) >= 2
    assert (
        run(runtime, [RowEvents("g", [Prefilled(prompt)], "guard", {"max_backtrack": 4})])[
            "g"
        ].actions
        == []
    )
    assert runtime.states["g"].scratch["score"] < 0.5
    answer = run(runtime, [RowEvents("g", [Added(0, rest), ForwardPass(len(rest))], "guard")])["g"]
    assert answer.actions == [SteerVector("happy", 3.0, None), Backtrack(2)]
    # once on, it stays on without repeating itself
    answer = run(runtime, [RowEvents("g", [Sampled(len(rest), 5), ForwardPass(len(rest) + 1)],
                                     "guard")])["g"]  # fmt: skip
    assert answer.actions == []
    runtime.release(["h", "s", "g"])


@pytest.mark.parametrize("policy", ["picky", "picky_batch"])
def test_a_policy_that_raises_on_one_row_fails_that_row_alone(runtime, policy):
    rows = [RowEvents(rid, [Prefilled([1, 2, 3]), ForwardPass(0)], policy)
            for rid in ("ok1", "bad", "ok2", "ok3")]  # fmt: skip
    answers = run(runtime, rows)
    assert answers["bad"].error and not answers["bad"].actions
    for rid in ("ok1", "ok2", "ok3"):
        assert answers[rid].error is None, answers[rid]
        (action,) = answers[rid].actions
        assert action == ForceTokens([7]) if policy == "picky" else action.delta.sum() > 0
    runtime.release([r.request_id for r in rows])


def test_user_policies_by_import_path_and_their_errors(runtime):
    answers = run(
        runtime,
        [
            RowEvents("f", [Prefilled([1, 2, 3]), ForwardPass(0)], "force"),
            RowEvents("i", [Prefilled([1, 2, 3])], "illegal"),
            RowEvents("e", [Prefilled([1, 2, 3])], "explode"),
            RowEvents("n", [Prefilled([1, 2, 3])], f"{__name__}:ForceFirstToken"),
            RowEvents("u", [Prefilled([1, 2, 3])], None),
        ],
    )
    assert answers["f"].actions == [ForceTokens([7])] and answers["f"].error is None
    assert "Backtrack is not allowed after event Prefilled" in answers["i"].error
    assert "policy blew up" in answers["e"].error
    # a request names a configured policy, never an import path
    assert "is not configured" in answers["n"].error
    assert answers["u"].actions == [] and answers["u"].error is None
    runtime.release(["f", "i", "e", "n", "u"])


def test_mismatched_tokenizers_are_refused_at_start(tiny, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    big = tmp_path / "big"
    big.mkdir()
    shutil.copy(f"{tiny.big}/config.json", big / "config.json")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(["other words entirely"] * 20, trainers.BpeTrainer(vocab_size=280))
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(str(big))
    config = SteeringConfig.model_validate(
        {"expert_adapter": "positive", "policies": CONFIG["policies"][:1]}
    )
    with pytest.raises(
        TokenizerMismatchError, match=rf"small model \({tiny.small}.*big model \({big}"
    ):
        SteeringRuntime(config, str(big), tiny.small, tiny.small_adapters)


def test_unknown_policy_kind_and_missing_expert_are_clear(tiny):
    config = SteeringConfig.model_validate({"policies": [{"name": "x", "kind": "nonsense"}]})
    with pytest.raises(ValueError, match="unknown policy kind 'nonsense'; built-in: vector_guard"):
        SteeringRuntime(config, tiny.big, tiny.small, tiny.small_adapters)
    config = SteeringConfig.model_validate({"policies": [{"name": "p", "kind": "proxy_tuning"}]})
    with pytest.raises(ValueError, match="needs an expert adapter"):
        SteeringRuntime(config, tiny.big, tiny.small, tiny.small_adapters)


def test_released_requests_give_their_cache_back(runtime):
    small = runtime.small_model
    blocks = getattr(small, "blocks", None)
    free_before = blocks.num_free if blocks else None
    rows = [
        RowEvents(f"k{i}", [Prefilled(list(range(3, 40))), ForwardPass(0)], "proxy")
        for i in range(3)
    ]
    run(runtime, rows)
    assert all(len(runtime.states[f"k{i}"].kv) == 2 for i in range(3))  # base and expert
    if blocks:
        assert blocks.num_free < free_before
    runtime.release([f"k{i}" for i in range(3)])
    assert not any(f"k{i}" in runtime.states for i in range(3))
    if blocks:
        assert blocks.num_free == free_before


def test_a_policy_may_name_its_expert_by_path(tiny):
    path = tiny.small_adapters["positive"]
    config = SteeringConfig.model_validate(
        {"policies": [{"name": "p", "kind": "proxy_tuning", "params": {"expert": path}}]}
    )
    rt = SteeringRuntime(config, tiny.big, tiny.small, {})
    assert rt.small_model.variants == ["base", "positive"]
    ok = run(rt, [RowEvents("a", [Prefilled([3, 4, 5]), ForwardPass(0)], "p")])["a"]
    assert isinstance(only_logits(ok), AdjustedLogits)
    bad = run(rt, [RowEvents("b", [Prefilled([3])], "p", {"expert": "other"})])["b"]
    assert "cannot choose another" in bad.error


def test_request_state_keeps_exactly_the_cache_prefix_that_still_holds():
    from models.steering.paged_small_model import PagedKV
    from models.steering.state import RequestState

    state = RequestState("s", "proxy")
    state.reset([1, 2, 3], [4, 5])
    kv = state.kv["base"] = PagedKV(state.tokens, num_computed=5)
    state.sync([1, 2, 3, 4, 5, 6, 7], 3)  # grew: the cache keeps all it read
    assert state.generated == [4, 5, 6, 7] and kv.num_computed == 5
    state.set_generated(4, [8])  # a new token at the end
    assert state.tokens == [1, 2, 3, 4, 5, 6, 7, 8] and kv.num_computed == 5
    state.set_generated(4, [8])  # already known (a prefetch read it): nothing moves
    assert state.generated == [4, 5, 6, 7, 8] and kv.num_computed == 5
    state.set_generated(3, [7])  # token 3 is last now: token 4 is gone, the cache holds
    assert state.generated == [4, 5, 6, 7] and kv.num_computed == 5
    state.sync([1, 2, 3, 4, 9, 6], 3)  # same prefix up to token 4, then a rewrite
    assert state.tokens == [1, 2, 3, 4, 9, 6] and kv.num_computed == 4
    state.sync([1, 2, 0, 4], 3)  # a new prompt: only what it shares stays
    assert state.prompt_ids == [1, 2, 0] and state.generated == [4] and kv.num_computed == 2
    state.set_generated(0, [5])  # a rewrite at step 0 (a backtrack)
    assert state.tokens == [1, 2, 0, 5] and kv.num_computed == 2


def test_stacked_small_model_logits_are_a_view_of_one_read():
    from models.steering.state import SmallOutput, stack_logits

    read = torch.arange(24.0).view(6, 4)  # base and expert rows of three requests, interleaved
    base = [SmallOutput(read, row, length=3) for row in (0, 2, 4)]
    stacked = stack_logits(base)
    assert torch.equal(stacked, read[[0, 2, 4]])
    assert stacked.data_ptr() == read.data_ptr()  # no copy
    assert torch.equal(stack_logits(base[:1]), read[:1])
    mixed = [SmallOutput(read, 3, 3), SmallOutput(read, 1, 3), SmallOutput(read[1:], 0, 3)]
    assert torch.equal(stack_logits(mixed), read[[3, 1, 1]])  # not evenly spaced: a copy


def test_the_small_model_refuses_sequences_past_its_context(tiny):
    config = SteeringConfig.model_validate({**CONFIG, "small_model_runner": "engine"})
    short = SteeringRuntime.from_source(config, "builtin:tiny", max_model_len=8)
    assert short.small_model.max_len == 8
    rows = [RowEvents("long", [ForwardPass(6)], "proxy", {}, 3, token_ids=list(range(3, 12))),
            RowEvents("ok", [ForwardPass(2)], "proxy", {}, 3, token_ids=[3, 4, 5, 6, 7])]  # fmt: skip
    answers = run(short, rows)
    assert "reads at most 8 (steering.max_model_len)" in answers["long"].error
    only_logits(answers["ok"])  # the rest of the step is answered
    # the config's own setting wins over the big model's context
    config = config.model_copy(update={"max_model_len": 16})
    assert SteeringRuntime.from_source(config, "builtin:tiny", 8).small_model.max_len == 16
