"""Fused GPU kernels of the torch engine (Triton), one module per op, each with its torch
reference beside it: decode_attention, norm_rope (RMSNorm, q/k norm + RoPE, KV-cache write),
skinny_gemm and linear (decode-sized matmuls), lora (per-row multi-LoRA), tuning (which
matmul kernel serves a shape), launch (Triton availability, PDL, shared launch helpers).

The wrappers run their Triton kernel when the tensors live on CUDA and Triton is importable,
and their torch reference otherwise; decode attention and the plain KV-cache write leave that
choice to the attention layer (models.engine.attention).

All kernels are safe inside a CUDA graph: no host sync, no shape that depends on tensor values,
outputs allocated by torch (which takes them from the graph's private pool during capture).

KV-cache layout (fixed for the engine): per layer `k_cache`, `v_cache` of shape
[num_blocks, block_size, num_kv_heads, head_dim]; `block_tables` int32 [batch, max_blocks];
`context_lens` int32 [batch]; `slot_mapping` int64 [tokens] = block * block_size + offset, -1 for
a padding token that writes nothing. Query head h reads KV head h // (num_heads // num_kv_heads).
"""
