"""The prefill attention kernel (one Triton launch per step) against its torch reference on
ragged batches over a paged cache, with and without cached context before the new tokens; and
the engine's greedy tokens with chunked against whole-prompt prefill. Marked gpu."""

from __future__ import annotations

import math

import pytest
import torch

from models.engine.kernels import prefill_attention as pa

pytestmark = pytest.mark.gpu


def ragged_step(q_lens, ctx_lens, heads, kv_heads, dim, block_size, dtype, seed):
    """A random step: a paged cache with shuffled blocks holding each row's whole context, the
    flat query tokens (a strided view, as the fused qkv output gives), and the row metadata."""
    gen = torch.Generator().manual_seed(seed)
    max_blocks = max(math.ceil(n / block_size) for n in ctx_lens)
    num_blocks = 1 + len(ctx_lens) * max_blocks
    shape = (num_blocks, block_size, kv_heads, dim)
    k_cache = torch.randn(shape, generator=gen).to("cuda", dtype)
    v_cache = torch.randn(shape, generator=gen).to("cuda", dtype)
    order = torch.randperm(num_blocks - 1, generator=gen) + 1
    tables = order.view(len(ctx_lens), max_blocks).to("cuda", torch.int32)
    tokens = sum(q_lens)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, generator=gen).to("cuda", dtype)
    q = qkv[:, : heads * dim].view(tokens, heads, dim)
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32).cuda()
    ctx = torch.tensor(ctx_lens, dtype=torch.int32).cuda()
    return q, k_cache, v_cache, tables, cu, ctx


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


CASES = {  # name: (query tokens per row, context per row); context > query: cached prefix
    "fresh prompts": ([7, 64, 1, 130, 33], [7, 64, 1, 130, 33]),
    "cached prefixes": ([5, 64, 100, 1, 17], [40, 64, 300, 1, 500]),
    "chunk after a long prefix": ([256], [1000]),
    "decode rows mixed in": ([1, 1, 200, 1], [90, 12, 200, 513]),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize(
    "heads,kv_heads,dim,block_size",
    [(16, 8, 128, 16), (8, 1, 64, 16), (6, 2, 128, 4), (4, 4, 32, 8)],
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_prefill_kernel_matches_reference(case, heads, kv_heads, dim, block_size, dtype):
    q_lens, ctx_lens = CASES[case]
    q, kc, vc, tables, cu, ctx = ragged_step(
        q_lens, ctx_lens, heads, kv_heads, dim, block_size, dtype, seed=list(CASES).index(case)
    )
    scale = dim**-0.5
    out = pa.prefill_attention(q, kc, vc, tables, cu, ctx, max(q_lens), scale)
    # the reference in float32 over the same (rounded) inputs
    ref = pa.prefill_attention_ref(q.float(), kc.float(), vc.float(), tables, cu, ctx, scale)
    assert out.shape == q.shape and out.dtype == dtype
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < (1e-4 if dtype == torch.float32 else 1e-2)


def test_prefill_kernel_writes_only_new_tokens_and_reads_cache_only():
    """Keys past a row's context (other rows' blocks, the null block) must not leak in: poison
    every cache slot a row does not own and check the output stays the reference's."""
    q_lens, ctx_lens = [33, 3], [50, 70]
    q, kc, vc, tables, cu, ctx = ragged_step(q_lens, ctx_lens, 16, 8, 128, 16, torch.bfloat16, 3)
    owned = torch.zeros(kc.shape[0] * kc.shape[1], dtype=torch.bool, device="cuda")
    for row, n in enumerate(ctx_lens):
        pos = torch.arange(n, device="cuda")
        owned[tables[row].long()[pos // 16] * 16 + pos % 16] = True
    for cache in (kc, vc):
        cache.view(-1, 8, 128)[~owned] = float("nan")
    out = pa.prefill_attention(q, kc, vc, tables, cu, ctx, max(q_lens), 128**-0.5)
    ref = pa.prefill_attention_ref(q.float(), kc.float(), vc.float(), tables, cu, ctx, 128**-0.5)
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < 1e-2


def test_chunked_prefill_keeps_greedy_tokens(tmp_path):
    """A prompt prefilled in 16-token chunks (each chunk attends to the cached ones before it)
    decodes the same greedy tokens as the whole prompt in one step, in float32."""
    from models.engine.config import EngineConfig
    from models.engine.llm_engine import LLMEngine
    from models.engine.tiny_checkpoint import build_tiny_checkpoint
    from models.protocol.requests import GenerationRequest, SamplingParams

    path = build_tiny_checkpoint(tmp_path / "m", hidden_size=128, head_dim=32,
                                 num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    prompts = [[(7 * i + 3 * r) % 500 + 2 for i in range(n)] for r, n in enumerate([70, 5, 41])]

    def greedy(budget: int) -> list[list[int]]:
        config = EngineConfig(device="cuda", dtype="float32", num_kv_blocks=256, block_size=4,
                              max_num_batched_tokens=budget, max_model_len=256)  # fmt: skip
        eng = LLMEngine(config, path, tokenizer=None)
        params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
        for r, p in enumerate(prompts):
            eng.add_request(GenerationRequest(f"r{r}", p, params))
        tokens: dict[str, list[int]] = {}
        while eng.has_unfinished():
            for out in eng.step():
                tokens.setdefault(out.request_id, []).extend(out.token_ids)
        return [tokens[f"r{r}"] for r in range(len(prompts))]

    assert greedy(16) == greedy(4096)
