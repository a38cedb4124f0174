"""How the engine's Triton kernels are launched: whether Triton serves a tensor, programmatic
dependent launch (PDL), the matmul precision, and `pdl_start`, every kernel's first statement.

Without Triton (CPU machines) `triton` and `tl` are None and only the torch references run.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
    from triton.runtime.errors import OutOfResources
except ImportError:  # CPU machines: the torch references are used instead
    triton = None
    tl = None
    OutOfResources = RuntimeError  # never raised without Triton

HAS_TRITON = triton is not None


def use_triton(t: torch.Tensor) -> bool:
    """Whether the Triton kernels serve this tensor (CUDA tensor and Triton installed)."""
    return HAS_TRITON and t.is_cuda


_pdl: bool | None = None


def pdl_enabled() -> bool:
    """Whether kernels launch with programmatic dependent launch (PDL, Hopper and later):
    each kernel's programs may then be scheduled while the kernel before it drains, and wait
    in `pdl_start` (griddepcontrol.wait) until its results are visible, which hides most of
    the launch gap between the many small kernels of a decode step. TANDEM_PDL=0 turns it
    off; Triton without `launch_pdl` or an older GPU never use it."""
    global _pdl
    if _pdl is None:
        _pdl = bool(
            HAS_TRITON
            and os.environ.get("TANDEM_PDL", "1") != "0"
            and torch.cuda.is_available()
            and torch.cuda.get_device_capability()[0] >= 9
            and hasattr(getattr(tl.extra, "cuda", None), "gdc_wait")
        )
    return _pdl


def pdl_options() -> dict:
    """Launch keywords of every Triton kernel here: its USE_PDL switch and Triton's launch_pdl."""
    return {"USE_PDL": True, "launch_pdl": True} if pdl_enabled() else {"USE_PDL": False}


def dot_precision(t: torch.Tensor) -> str:
    """Matrix products in full fp32 for fp32 tensors (tf32 would differ from torch's fp32)."""
    return "ieee" if t.dtype == torch.float32 else "tf32"


if HAS_TRITON:

    @triton.jit
    def pdl_start(USE_PDL: tl.constexpr):
        """First statement of every kernel: under PDL, wait until the kernels before this one
        have finished and their writes are visible, then let the next kernel's programs be
        scheduled as soon as this one's last programs have started."""
        if USE_PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
