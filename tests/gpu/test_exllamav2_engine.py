"""The exllamav2 engine on CUDA with the built-in toy model loaded as an FP16 HF checkpoint
(marked gpu; skipped without CUDA or exllamav2, whose import JIT-compiles its extension):
greedy tokens against transformers (teacher-forced top-1 agreement), a steering vector moves
the logits the way it moves transformers' (cosine of the logit changes), and what exllamav2
cannot do is refused by capability."""

from __future__ import annotations

import asyncio

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

TEXTS = ["Anna has a red ball.", "The blue map is", "Omar feels"]


@pytest.fixture(scope="module")
def parts():
    try:
        from models.engines.exllamav2 import ExLlamaV2Engine
    except (ImportError, OSError, RuntimeError) as exc:
        pytest.skip(f"exllamav2 is not usable here: {exc!r}")
    from transformers import AutoModelForCausalLM

    from models.builtin import resolve_source
    from models.engine.config import EngineConfig

    big = resolve_source("builtin:toy").big
    engine = ExLlamaV2Engine(EngineConfig(kind="exllamav2", max_model_len=512), big)
    hf = AutoModelForCausalLM.from_pretrained(big, dtype=torch.float32).cuda().eval()
    return engine, hf


def exl_logits(engine, ids: list[int], deltas=None) -> torch.Tensor:
    """Teacher-forced logits [len(ids), vocab]: the prompt's first token, then one per step."""
    engine.cache.current_seq_len = 0
    rows = [engine.forward(torch.tensor([ids[:1]]), engine.cache, deltas)]
    for token in ids[1:]:
        rows.append(engine.forward(torch.tensor([[token]]), engine.cache, deltas))
    return torch.cat(rows).cpu()


@torch.no_grad()
def hf_logits(hf, ids: list[int]) -> torch.Tensor:
    return hf(torch.tensor([ids], device="cuda")).logits[0].float().cpu()


def test_greedy_tokens_agree_with_transformers(parts):
    engine, hf = parts
    tok = engine.tokenizer
    agree = total = 0
    for text in TEXTS:
        prompt = tok.encode(text, add_special_tokens=False)
        out = hf.generate(torch.tensor([prompt], device="cuda"), max_new_tokens=16,
                          min_new_tokens=16, do_sample=False)[0].tolist()  # fmt: skip
        ex = exl_logits(engine, out[:-1]).argmax(-1)
        ref = hf_logits(hf, out[:-1]).argmax(-1)
        agree += int((ex[len(prompt) - 1:] == ref[len(prompt) - 1:]).sum())
        total += len(out) - len(prompt)
    print(f"teacher-forced top-1 agreement exllamav2 FP16 vs transformers fp32: {agree}/{total}")
    assert agree / total >= 0.95


def test_a_steering_vector_moves_the_logits_like_transformers(parts):
    from models.steering.vectors import SteeringVector, steered_transformers

    engine, hf = parts
    g = torch.Generator().manual_seed(0)
    layers, coeff = [1, 2, 3], 4.0
    hidden = hf.config.hidden_size
    directions = torch.randn(hf.config.num_hidden_layers, hidden, generator=g)
    directions = directions / directions.norm(dim=-1, keepdim=True)
    vector = SteeringVector("v", {layer: directions[layer] for layer in layers})
    engine.register_vector("v", directions)
    ids = engine.tokenizer.encode(TEXTS[0], add_special_tokens=False)
    plain_hf = hf_logits(hf, ids)[-1]
    with steered_transformers(hf, vector, coeff):
        steered_hf = hf_logits(hf, ids)[-1]
    from models.protocol.requests import GenerationRequest, SteerVectorSpec

    request = GenerationRequest("s", ids, steer_vectors=[SteerVectorSpec("v", coeff, layers)])
    plain_ex = exl_logits(engine, ids)[-1]
    steered_ex = exl_logits(engine, ids, engine.deltas(request))[-1]
    cosine = torch.nn.functional.cosine_similarity(steered_ex - plain_ex, steered_hf - plain_hf,
                                                   dim=0)  # fmt: skip
    print(f"cosine of the logit changes (exllamav2 vs transformers): {float(cosine):.4f}")
    assert cosine >= 0.9


def test_generate_streams_and_refuses_what_it_cannot_do(parts):
    from models.protocol.engine import UnsupportedByEngineError, check_capabilities
    from models.protocol.requests import GenerationRequest, SamplingParams
    from models.protocol.steering import SteeringRequest

    engine, _ = parts
    ids = engine.tokenizer.encode(TEXTS[1], add_special_tokens=False)
    request = GenerationRequest("g", ids, SamplingParams(max_tokens=8, temperature=0,
                                                         ignore_eos=True))  # fmt: skip

    async def run():
        return [out async for out in engine.generate(request)]

    outs = asyncio.run(run())
    assert sum(len(o.token_ids) for o in outs) == 8 and outs[-1].finish_reason == "length"
    with pytest.raises(UnsupportedByEngineError, match="engine 'exllamav2'.*token_events"):
        check_capabilities(engine, GenerationRequest("p", ids, steering=SteeringRequest("x")))
