"""CUDA streams that no other part of the process holds.

cuBLAS keys its workspace (scratch memory, including the counters its split-K kernels spin on)
by stream, and a CUDA graph bakes in the workspace of the stream it was captured on. Two graphs
captured on the same stream therefore share scratch memory; replayed at the same time on
different streams (the big model's decode graph on the main stream, the small model's on a side
stream, as colocated steering does) their matmuls race on it, which was seen as a GPU hang.
`torch.cuda.graph()` without a stream uses one class-wide default capture stream, so every
capture and every stream that may overlap another takes its own stream from here.
"""

from __future__ import annotations

import gc
import weakref

import torch

_held: set[tuple[int, int]] = set()  # (device index, stream handle)


def private_stream(
    device: torch.device | int | None = None, owner: object = None, priority: int = 0
):
    """A pool stream not held by any other caller; released when `owner` is collected (held
    for the life of the process when there is no owner). priority -1: from the high-priority
    pool (its kernels are scheduled first when streams compete for the GPU)."""
    for attempt in range(2):
        if attempt:
            gc.collect()  # owners caught in reference cycles give their streams back
        for _ in range(64):  # the pool hands out its 32 streams round-robin
            stream = torch.cuda.Stream(device, priority=priority)
            key = (stream.device_index, stream.cuda_stream)
            if key not in _held:
                _held.add(key)
                if owner is not None:
                    weakref.finalize(owner, _held.discard, key)
                return stream
    raise RuntimeError(f"every pooled CUDA stream is held ({len(_held)}); free some engines")
