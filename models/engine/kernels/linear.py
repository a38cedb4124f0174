"""The matmuls the model calls: `linear`, `linear_partials`, `silu_mul_linear` and
`lora_linear`, each served by cuBLAS or a skinny-GEMM kernel as the tuner chose for its shape.
"""

from __future__ import annotations

import torch

from models.engine.kernels.lora import RowLoRA
from models.engine.kernels.skinny_gemm import skinny_linear
from models.engine.kernels.tuning import tuned_config, tuned_linear, unfused_lora_linear


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T (+ bias), like F.linear. On CUDA with at most 32 rows (decode), a Triton
    skinny-GEMM kernel serves a shape when it beat cuBLAS there: each (out, in, row bucket) is
    timed once, at its first call outside graph capture (engine warm-up), in CUDA graphs."""
    return tuned_linear(x, weight, bias, partials=False)


def linear_partials(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Like `linear`, but may return float32 split-K partial sums [S, rows, out] (when that was
    fastest for the shape): for a result that only feeds `rms_norm(..., residual)`, which sums
    them, so a small matmul can spread over more of the GPU without a separate reduction."""
    return tuned_linear(x, weight, bias, partials=True)


def silu_mul_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """silu(x @ gate.T) * (x @ up.T) for weight = [gate; up] (a fused gate_up projection
    without bias). On CUDA at decode sizes one skinny kernel computes both halves and the
    product when that beat cuBLAS plus the silu-and-mul kernel (timed like `linear`); else
    exactly those two."""
    return tuned_linear(x, weight, None, partials=False, gated=True)


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora: RowLoRA,
    partials: bool = False,
    gated: bool = False,
) -> torch.Tensor:
    """x @ weight.T (+ bias) plus the per-row LoRA `lora` (see `lora_add_`). partials: may
    return float32 split-K partial sums, as `linear_partials`; gated (weight = [gate; up],
    parts [I, I], no bias): silu(gate) * up, [T, I]. On CUDA at decode sizes the LoRA runs
    inside the skinny GEMM, one launch, where the tuner found that faster than the linear plus
    `lora_add_` (plus silu-and-mul when gated); else exactly those (torch on CPU)."""
    config = tuned_config(x, weight, bias, partials, gated, lora)
    if config is not None:
        return skinny_linear(x, weight, bias, config, gated, lora)
    return unfused_lora_linear(x, weight, bias, lora, partials, gated)
