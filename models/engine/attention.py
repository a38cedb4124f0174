"""Attention over the paged KV cache, and the per-step batch layout every kernel agrees on.

KV cache layout (fixed, so the torch reference and the CUDA/Triton kernels agree):

- per layer `k_cache`, `v_cache`: [num_blocks, block_size, num_kv_heads, head_dim]
- `block_tables`: int32 [batch, max_blocks]; row i lists the cache blocks of sequence i in
  order, padded with 0 (block 0 is the null block: never handed to a sequence, so padded
  rows of a CUDA-graph batch may write there freely)
- `context_lens`: int32 [batch]; tokens of sequence i in the cache after this step's write
- `slot_mapping`: int64 [num_tokens]; cache slot of each new token = block_id * block_size +
  offset in the block

`store_kv` and `paged_attention` (one query per sequence: decode) run the Triton kernel on
CUDA and its torch reference elsewhere (models.engine.kernels: one reference per op);
`varlen_attention` serves prefill chunks and multi-token appends.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from models.engine.kernels.decode_attention import (
    NewToken,
    paged_decode_attention,
    paged_decode_attention_ref,
)
from models.engine.kernels.launch import use_triton
from models.engine.kernels.norm_rope import store_kv_cache, store_kv_cache_ref


@dataclass
class ForwardBatch:
    """The tensors one forward pass needs besides token ids and positions.

    Decode batches (`is_decode`: every sequence adds exactly one token) have static shapes
    once padded to a batch bucket, so the whole decode forward can be captured in a CUDA graph.
    `token_rows` maps each token to its row (sequence) for per-row steering and LoRA.
    """

    is_decode: bool
    slot_mapping: torch.Tensor  # int64 [num_tokens]
    block_tables: torch.Tensor  # int32 [batch, max_blocks]
    context_lens: torch.Tensor  # int32 [batch]
    query_lens: list[int]  # new tokens per sequence (host side, prefill path only)
    token_rows: torch.Tensor  # int64 [num_tokens]
    steer_deltas: torch.Tensor | None = None  # [num_layers, batch, hidden]; zero = unsteered
    lora_weights: torch.Tensor | None = None  # [batch, adapter_slots]; row's weight per slot


def store_kv(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write new keys/values [num_tokens, num_kv_heads, head_dim] into their cache slots (slot
    -1 writes nothing): the Triton kernel on CUDA, the torch reference elsewhere."""
    write = store_kv_cache if use_triton(k) else store_kv_cache_ref
    write(k, v, k_cache, v_cache, slot_mapping)


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    batch: ForwardBatch,
    scale: float,
    new_token: NewToken | None = None,
) -> torch.Tensor:
    """Decode attention: q [batch, num_heads, head_dim], one query per sequence, attending to
    the first context_lens[i] cached tokens of its blocks (0: zeros). Returns q's shape.

    The flash-decoding kernel on CUDA, the torch reference elsewhere; both static-shape, so a
    CUDA graph can capture them. With `new_token`, q is raw and the step's k / v are not in the
    cache yet (see `paged_decode_attention`): the kernel finishes them, the torch path first.
    """
    tables, lens = batch.block_tables, batch.context_lens
    if use_triton(q):
        return paged_decode_attention(q, k_cache, v_cache, tables, lens, scale, new_token=new_token)
    if new_token is not None:
        new_token.prepare(q, k_cache, v_cache)
    return paged_decode_attention_ref(q, k_cache, v_cache, tables, lens, scale)


def varlen_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    batch: ForwardBatch,
    scale: float,
) -> torch.Tensor:
    """Causal attention for sequences adding several tokens (prefill chunks, forced tokens):
    q [num_tokens, num_heads, head_dim], tokens of each sequence contiguous; the new tokens
    are the last query_lens[i] of context_lens[i] cached ones. Returns q's shape."""
    head_dim = q.shape[2]
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    outputs = []
    start = 0
    for row, q_len in enumerate(batch.query_lens):
        ctx = int(batch.context_lens[row])
        blocks = batch.block_tables[row, : (ctx + block_size - 1) // block_size].long()
        k = k_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:ctx]
        v = v_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:ctx]
        q_pos = torch.arange(ctx - q_len, ctx, device=q.device)
        mask = torch.arange(ctx, device=q.device)[None, :] <= q_pos[:, None]
        q_row = q[start : start + q_len].transpose(0, 1)
        out = F.scaled_dot_product_attention(
            q_row, k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, scale=scale,
            enable_gqa=True,
        )
        outputs.append(out.transpose(0, 1))
        start += q_len
    return torch.cat(outputs, dim=0)
