"""Steering that a user would notice, on the trained toy models (builtin:toy) through the torch
engine: a vector extracted from positive/negative pairs pushes the next word towards positive
feelings; proxy tuning with the small model's `positive` expert turns negative stories
positive; a vector guard that watches for gloom turns the vector on where it shows."""

from __future__ import annotations

import pytest
import torch

from models.builtin import quality, world
from models.engine.config import EngineConfig
from models.engine.llm_engine import LLMEngine
from models.protocol.requests import GenerationRequest, SamplingParams, SteerVectorSpec
from models.protocol.steering import SteeringRequest
from models.steering.config import SteeringConfig
from models.steering.runtime import SteeringRuntime
from models.steering.vectors import default_layers, extract_vector, transformers_hidden_states


@pytest.fixture(scope="module")
def tok(toy):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(toy.big)


def story(text: str) -> str:
    return quality.chat_text(f"Continue the story: {text}")


@pytest.fixture(scope="module")
def positive_vector(toy, tok):
    from transformers import AutoModelForCausalLM

    big = AutoModelForCausalLM.from_pretrained(toy.big, dtype=torch.float32).eval()
    pairs = world.steering_pairs(16)
    read = transformers_hidden_states(big, tok, pool="mean")
    return extract_vector(
        "positive", read, [story(p) for p, _ in pairs], [story(n) for _, n in pairs],
        layers=default_layers(big.config.num_hidden_layers),
    )  # fmt: skip


def engine(toy, vector, observer=None) -> LLMEngine:
    eng = LLMEngine(EngineConfig(num_kv_blocks=512, block_size=16, dtype="float32"), toy.big)
    eng.register_vector("positive", vector.as_tensor(eng.args.num_layers))
    if observer is not None:
        eng.set_step_observer(observer)
    return eng


def run(eng, requests) -> dict[str, tuple[list[int], list]]:
    out: dict[str, tuple[list[int], list]] = {r.request_id: ([], []) for r in requests}
    for request in requests:
        eng.add_request(request)
    while eng.has_unfinished():
        for o in eng.step():
            out[o.request_id][0].extend(o.token_ids)
            out[o.request_id][1].append(o)
    return out


def test_vector_pushes_the_next_word_towards_positive_feelings(toy, tok, positive_vector):
    """log P(positive feeling) - log P(negative feeling) for "<name> feels", via the engine's
    logprobs over the whole vocabulary, rises with the coefficient."""
    eng = engine(toy, positive_vector)
    pos = [tok(" " + p).input_ids[0] for p, _ in world.FEELINGS]
    neg = [tok(" " + n).input_ids[0] for _, n in world.FEELINGS]
    prompts = [tok(story("The park is quiet.") + f"{name} feels").input_ids
               for name in world.PEOPLE[:6]]  # fmt: skip
    params = SamplingParams(max_tokens=1, temperature=0, logprobs=eng.args.vocab_size)

    def margin(coeff: float) -> float:
        spec = [SteerVectorSpec("positive", coeff)] if coeff else []
        reqs = [GenerationRequest(f"m{coeff}-{i}", p, params, steer_vectors=spec)
                for i, p in enumerate(prompts)]  # fmt: skip
        margins = []
        for _, outs in run(eng, reqs).values():
            top = dict(next(o.logprobs[0].top for o in outs if o.logprobs))
            up = torch.tensor([top[i] for i in pos]).logsumexp(0)
            down = torch.tensor([top[i] for i in neg]).logsumexp(0)
            margins.append(float(up - down))
        return sum(margins) / len(margins)

    margins = [margin(c) for c in (0.0, 4.0, 8.0, 16.0)]
    # Rises with the coefficient until it saturates (then flat within 0.1 nat).
    assert all(b > a - 0.1 for a, b in zip(margins[:-1], margins[1:], strict=True)), margins
    assert margins[-1] > margins[0] + 1.0, margins


def test_proxy_tuning_turns_negative_stories_positive(toy, tok, positive_vector):
    config = SteeringConfig.model_validate(
        {"expert_adapter": "positive",
         "policies": [{"name": "proxy", "kind": "proxy_tuning", "params": {"alpha": 1.0}}]}
    )  # fmt: skip
    runtime = SteeringRuntime.from_source(config, "builtin:toy")
    eng = engine(toy, positive_vector, runtime)
    prompts = [tok(p).input_ids for p in quality.negative_prompts(12)]

    def stats(steering):
        reqs = [
            GenerationRequest(f"{bool(steering)}-{i}", p,
                              SamplingParams(max_tokens=24, temperature=0.7, seed=i),
                              steering=steering)
            for i, p in enumerate(prompts)
        ]  # fmt: skip
        texts = [tok.decode(t, skip_special_tokens=True) for t, _ in run(eng, reqs).values()]
        return quality.continuation_stats(texts)

    plain = stats(None)
    steered = stats(SteeringRequest("proxy", mode="sync"))
    assert plain["positive"] < 0.5
    assert steered["positive"] >= plain["positive"] + 0.4, (plain, steered)
    assert steered["valid"] >= 0.8


def test_vector_guard_steers_only_the_gloomy_stories(toy, tok, positive_vector):
    pairs = world.steering_pairs(16)
    config = SteeringConfig.model_validate(
        {"policies": [{"name": "cheer_up", "kind": "vector_guard", "params": {
            "vector": "positive", "coeff": 8.0, "threshold": 0.0, "concept_layer": 0,
            # the concept watched for is gloom: its positive side is the negative text
            "positive": [story(n) for _, n in pairs], "negative": [story(p) for p, _ in pairs],
        }}]}
    )  # fmt: skip
    runtime = SteeringRuntime.from_source(config, "builtin:toy")
    eng = engine(toy, positive_vector, runtime)
    gloomy = [tok(p).input_ids for p in quality.negative_prompts(6)]
    sunny = [tok(story(p)).input_ids for p in world.mood_prompts(6, True, seed=5)]
    params = SamplingParams(max_tokens=8, temperature=0)
    steering = SteeringRequest("cheer_up", mode="sync")
    reqs = [GenerationRequest(f"g{i}", p, params, steering=steering) for i, p in enumerate(gloomy)]
    reqs += [GenerationRequest(f"s{i}", p, params, steering=steering) for i, p in enumerate(sunny)]
    out = run(eng, reqs)
    turned_on = {
        rid for rid, (_, outs) in out.items()
        if any(i.action == "SteerVector" for o in outs for i in o.interventions)
    }  # fmt: skip
    assert len([r for r in turned_on if r.startswith("g")]) >= 5, turned_on
    assert not [r for r in turned_on if r.startswith("s")], turned_on
