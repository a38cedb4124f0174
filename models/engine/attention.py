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

from models.engine.kernels.decode_attention import (
    NewToken,
    paged_decode_attention,
    paged_decode_attention_ref,
)
from models.engine.kernels.launch import use_triton
from models.engine.kernels.norm_rope import store_kv_cache, store_kv_cache_ref
from models.engine.kernels.prefill_attention import prefill_attention


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
    cu_seqlens_q: torch.Tensor | None = None  # int32 [batch + 1]: row i's tokens start here
    max_query_len: int = 0  # the most new tokens of one row (host side; 0 = not computed yet)

    def prefill_layout(self, device: torch.device) -> tuple[torch.Tensor, int]:
        """cu_seqlens_q and max_query_len, built once per step from the host query_lens when
        the caller gave none (ModelRunner does: in the step's one host->device copy)."""
        if self.cu_seqlens_q is None:
            starts = [0]
            for n in self.query_lens:
                starts.append(starts[-1] + n)
            self.cu_seqlens_q = torch.tensor(starts, dtype=torch.int32).to(device)
        if not self.max_query_len:
            self.max_query_len = max(self.query_lens)
        return self.cu_seqlens_q, self.max_query_len


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
    are the last query_lens[i] of context_lens[i] cached ones. Returns q's shape. One Triton
    launch for the whole step on CUDA (see models.engine.prefill_attention)."""
    cu_seqlens_q, max_query_len = batch.prefill_layout(q.device)
    return prefill_attention(
        q, k_cache, v_cache, batch.block_tables, cu_seqlens_q, batch.context_lens,
        max_query_len, scale,
    )  # fmt: skip
