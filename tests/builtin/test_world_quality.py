"""The shipped toy models mean something: small samples, margins below bench/quality.py's numbers.

Runs the real shipped weights (builtin:toy) with transformers on CPU. Each check compares
against a baseline measured in the same test (no context, base model, coefficient or alpha 0).
"""

from __future__ import annotations

import pytest
import torch

from models.builtin import quality


@pytest.fixture(scope="module")
def toy():
    torch.manual_seed(0)
    return quality.load_toy("builtin:toy", "cpu")


def test_big_model_writes_grammatical_sentences(toy):
    result = quality.fluency(toy, 16)
    assert result["sentences"] >= 32
    assert result["valid"] >= 0.95


def test_base_model_copies_answers_from_context(toy):
    result = quality.context_accuracy(toy, 24)
    assert result["with_context"] >= 0.85
    assert result["without_context"] <= 0.25
    assert result["held_out_passages"] >= 0.4
    # A fact unique of its kind in the passage is copied; among rivals of the same kind (another
    # person's place, thing or feeling) the toy model still guesses (bench/quality.py).
    assert result["held_out_without_rival"] >= 0.8


@pytest.mark.parametrize("task,least", [("rewrite", 0.85), ("list", 0.8), ("qa", 0.8)])
def test_task_adapters_beat_the_base_model(toy, task, least):
    result = quality.task_accuracy(toy, task, 16)
    assert result["adapter"] >= least, result["example"]
    assert result["base"] <= 0.1


def test_positive_steering_vector_turns_negative_stories(toy):
    result = quality.steering_sweep(toy, 24, [0.0, 4.0], layers=[2])["by_coeff"]
    assert result["0.0"]["positive"] <= 0.25
    assert result["4.0"]["positive"] >= result["0.0"]["positive"] + 0.45
    assert result["4.0"]["valid"] >= 0.85


def test_proxy_tuning_with_the_positive_expert_turns_negative_stories(toy):
    result = quality.proxy_sweep(toy, 24, [0.0, 1.0])["by_alpha"]
    assert result["0.0"]["positive"] <= 0.25
    assert result["1.0"]["positive"] >= 0.8
    assert result["1.0"]["valid"] >= 0.9
