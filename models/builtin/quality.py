"""Measures of what the toy models learned, with plain transformers (used by bench and tests).

Every measure compares against a baseline in the same run: with vs without context, adapter vs
base, steered vs unsteered. Sampling uses fixed seeds; prompts come from seeds the training
script does not use.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from models.builtin import world
from models.builtin.validate import (
    answer_is_right,
    check_task,
    complete_sentences,
    is_valid_sentence,
    sentiment,
)

EVAL_SEED = 424242


@dataclass
class ToyModels:
    """Loaded toy models (float32) and their tokenizer."""

    tok: object
    big: torch.nn.Module
    small: torch.nn.Module
    adapters: dict[str, str]
    small_adapters: dict[str, str]
    device: torch.device


def load_toy(source: str = "builtin:toy", device: str | None = None) -> ToyModels:
    """Load big and small in float32 (the shipped weights are bfloat16) on `device`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from models.builtin import resolve_source

    paths = resolve_source(source)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tok = AutoTokenizer.from_pretrained(paths.big)
    tok.padding_side = "left"

    def load(path):
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(dev).eval()

    return ToyModels(
        tok, load(paths.big), load(paths.small), paths.adapters, paths.small_adapters, dev
    )


def chat_text(user: str) -> str:
    return f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


@torch.no_grad()
def generate(
    m: ToyModels,
    model,
    prompts: list[str],
    max_new_tokens: int = 48,
    temperature: float = 0.0,
    seed: int = 0,
    logits_processor=None,
    batch_size: int = 32,
) -> list[str]:
    """Completions of raw prompt texts (chat prompts already templated), batched, left-padded."""
    out = []
    for i in range(0, len(prompts), batch_size):
        enc = m.tok(prompts[i : i + batch_size], return_tensors="pt", padding=True,
                    add_special_tokens=False).to(m.device)  # fmt: skip
        torch.manual_seed(seed + i)
        kwargs = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
        ids = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            **(kwargs if temperature > 0 else {"do_sample": False}),
            logits_processor=logits_processor,
            pad_token_id=m.tok.pad_token_id,
        )
        out += m.tok.batch_decode(ids[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return [o.strip() for o in out]


def fluency(m: ToyModels, n: int, temperature: float = 1.0) -> dict:
    """Share of grammatical sentences in sampled big-model stories (chat and raw prompts)."""
    rng = random.Random(EVAL_SEED)
    prompts = []
    for i in range(n):
        if i % 2:
            prompts.append(
                chat_text(
                    rng.choice(
                        ["Tell me a story.", f"Tell me a story about {rng.choice(world.PEOPLE)}."]
                    )
                )
            )
        else:
            prompts.append(world.mood_sentence(rng, rng.choice(world.PEOPLE), rng.random() < 0.5))
    texts = generate(m, m.big, prompts, temperature=temperature, seed=1)
    sentences = [s for t in texts for s in complete_sentences(t)]
    valid = sum(is_valid_sentence(s) for s in sentences)
    return {
        "sentences": len(sentences),
        "valid": valid / max(1, len(sentences)),
        "example": texts[1],
    }


def context_accuracy(m: ToyModels, n: int) -> dict:
    """Accuracy on world questions with the relevant document in context vs without,
    and on held-out random passages."""
    docs = dict(world.world_documents())
    questions = world.world_questions()
    rng = random.Random(EVAL_SEED)
    questions = rng.sample(questions, min(n, len(questions)))
    with_ctx = [chat_text(world.context_prompt([docs[title]], q)) for q, _, title in questions]
    without = [chat_text(q) for q, _, _ in questions]
    keys = [key for _, key, _ in questions]
    a = generate(m, m.big, with_ctx, max_new_tokens=24)
    b = generate(m, m.big, without, max_new_tokens=24)
    held_prompts, held_keys, rivals = [], [], []
    for _ in range(n):
        messages, _, q = world.context_question(rng)
        held_prompts.append(
            "".join(f"<|im_start|>{x['role']}\n{x['content']}<|im_end|>\n" for x in messages)
            + "<|im_start|>assistant\n"
        )
        held_keys.append(q.key)
        rivals.append(world.has_rival(q, " ".join(x["content"] for x in messages)))
    c = generate(m, m.big, held_prompts, max_new_tokens=24)
    right = [answer_is_right(k, o) for k, o in zip(held_keys, c, strict=True)]
    return {
        "with_context": _share(answer_is_right(k, o) for k, o in zip(keys, a, strict=True)),
        "without_context": _share(answer_is_right(k, o) for k, o in zip(keys, b, strict=True)),
        "held_out_passages": _share(right),
        "held_out_with_rival": _share(r for r, x in zip(right, rivals, strict=True) if x),
        "held_out_without_rival": _share(r for r, x in zip(right, rivals, strict=True) if not x),
        "held_out_rival_questions": sum(rivals),
        "example": [with_ctx[0], a[0], b[0]],
    }


def task_accuracy(m: ToyModels, task: str, n: int) -> dict:
    """Checker pass rate of the task's adapter vs the base model on held-out prompts. For `qa`
    also the adapter's rate on n questions with a rival fact of the asked kind, which the task
    leaves out (`adapter_with_rival`: reported, not aimed at)."""
    from peft import PeftModel

    rng = random.Random(EVAL_SEED + world.TASKS.index(task))
    samples = [world.sample_task_prompt(task, rng) for _ in range(n)]
    rival = [world.qa_prompt(rng, rival=True) for _ in range(n)] if task == "qa" else []
    prompts = [chat_text(p) for p, _ in samples + rival]
    base_out = generate(m, m.big, prompts[:n], max_new_tokens=40)
    model = PeftModel.from_pretrained(m.big, m.adapters[task]).to(m.device).eval()
    try:
        tuned_out = generate(m, model, prompts, max_new_tokens=40)
    finally:
        model.unload()

    def passed(pairs, outputs) -> float:
        return _share(check_task(task, a, o) for (_, a), o in zip(pairs, outputs, strict=True))

    result = {
        "adapter": passed(samples, tuned_out[:n]),
        "base": passed(samples, base_out),
        "example": [samples[0][0], tuned_out[0], base_out[0]],
    }
    if rival:
        result["adapter_with_rival"] = passed(rival, tuned_out[n:])
        result["example_with_rival"] = [rival[0][0], rival[0][1], tuned_out[n]]
    return result


def middle_layers(model) -> list[int]:
    """The middle half of the decoder layers."""
    n = model.config.num_hidden_layers
    return list(range(n // 4, n - n // 4)) or [n // 2]


@torch.no_grad()
def extract_vector(
    m: ToyModels, pairs: list[tuple[str, str]], layers: list[int]
) -> dict[int, torch.Tensor]:
    """Per layer, the mean over pairs of (positive - negative) hidden states at the positions
    after the first differing token where both texts hold the same token: the difference the
    mood makes to the context, not the sentiment words themselves."""
    diffs: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    for pos, neg in pairs:
        ids_p, hs_p = _hidden_states(m, pos)
        ids_n, hs_n = _hidden_states(m, neg)
        if len(ids_p) == len(ids_n):
            keep = ids_p == ids_n
            keep[: int((~keep).nonzero()[0])] = False
        else:  # sentiment words of different token lengths: compare the final tokens only
            keep = None
        for layer in layers:
            a, b = hs_p[layer + 1][0], hs_n[layer + 1][0]  # +1: hidden_states[0] = embeddings
            diffs[layer].append((a[keep] - b[keep]).mean(0) if keep is not None else a[-1] - b[-1])
    return {layer: torch.stack(d).mean(0) for layer, d in diffs.items()}


def _hidden_states(m: ToyModels, text: str):
    enc = m.tok(text, return_tensors="pt").to(m.device)
    return enc["input_ids"][0], m.big(**enc, output_hidden_states=True).hidden_states


@contextmanager
def steered(model, vector: dict[int, torch.Tensor], coeff: float) -> Iterator[None]:
    """Add coeff * v_l to the output of decoder layer l (all positions) while inside."""
    handles = []
    for layer, v in vector.items():

        def hook(_module, _inputs, output, v=v):
            if isinstance(output, tuple):
                return (output[0] + coeff * v, *output[1:])
            return output + coeff * v

        handles.append(model.model.layers[layer].register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def continuation_stats(texts: list[str]) -> dict:
    """Share of continuations that are positive (sentiment > 0) and that are grammatical."""
    valid = [
        bool(complete_sentences(t)) and all(is_valid_sentence(s) for s in complete_sentences(t))
        for t in texts
    ]
    return {"positive": _share(sentiment(t) > 0 for t in texts), "valid": _share(valid)}


def negative_prompts(n: int) -> list[str]:
    return [
        chat_text(f"Continue the story: {p}") for p in world.mood_prompts(n, False, seed=EVAL_SEED)
    ]


def steering_sweep(
    m: ToyModels,
    n: int,
    coeffs: list[float],
    layers: list[int] | None = None,
    temperature: float = 0.7,
) -> dict:
    """Positive share and validity of continuations after negative openings, per coefficient
    of a vector from 256 steering pairs added at `layers` (default: the middle half)."""
    layers = layers or middle_layers(m.big)
    vector = extract_vector(m, world.steering_pairs(256), layers)
    prompts = negative_prompts(n)
    rows = {}
    for c in coeffs:
        with steered(m.big, vector, c):
            texts = generate(m, m.big, prompts, temperature=temperature, seed=7)
        rows[str(c)] = continuation_stats(texts)
    return {"layers": layers, "by_coeff": rows}


class ProxyTuning:
    """logits_big + alpha * (logits_expert - logits_small_base), as a transformers logits processor.

    Runs both small models on the whole sequence each step (no cache: the models are tiny)."""

    def __init__(self, base, expert, prompt_mask: torch.Tensor, alpha: float):
        self.base, self.expert, self.prompt_mask, self.alpha = base, expert, prompt_mask, alpha

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        grown = input_ids.shape[1] - self.prompt_mask.shape[1]
        mask = torch.cat(
            [self.prompt_mask, self.prompt_mask.new_ones((input_ids.shape[0], grown))], 1
        )
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        with self.expert.disable_adapter():
            base = self.base(input_ids=input_ids, attention_mask=mask, position_ids=pos).logits[
                :, -1
            ]
        expert = self.expert(input_ids=input_ids, attention_mask=mask, position_ids=pos).logits[
            :, -1
        ]
        return scores + self.alpha * (expert - base).to(scores.dtype)


def proxy_sweep(m: ToyModels, n: int, alphas: list[float], temperature: float = 0.7) -> dict:
    """Positive share and validity after negative openings with proxy tuning, per alpha."""
    from peft import PeftModel
    from transformers import LogitsProcessorList

    expert = PeftModel.from_pretrained(m.small, m.small_adapters["positive"]).to(m.device).eval()
    prompts = negative_prompts(n)
    rows = {}
    try:
        for a in alphas:
            texts = []
            for i in range(0, len(prompts), 32):
                chunk = prompts[i : i + 32]
                mask = m.tok(chunk, return_tensors="pt", padding=True, add_special_tokens=False)[
                    "attention_mask"
                ].to(m.device)
                proc = LogitsProcessorList([ProxyTuning(m.small, expert, mask, a)]) if a else None
                texts += generate(
                    m, m.big, chunk, temperature=temperature, seed=7 + i, logits_processor=proc
                )
            rows[str(a)] = continuation_stats(texts)
    finally:
        expert.unload()
    return {"by_alpha": rows}


def _share(flags) -> float:
    flags = list(flags)
    return round(sum(flags) / max(1, len(flags)), 4)
