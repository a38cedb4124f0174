"""Decode steps replayed from CUDA graphs, one graph per batch-size bucket.

A decode step has static shapes once its batch is padded up to a bucket, so it can be captured
once and replayed for the cost of one launch. Everything that varies per step (token ids,
positions, slots, block tables, context lengths, steering deltas, LoRA row weights) lives in
static buffers that the graph reads; the caller writes the step's values into the first rows
and the runner pads the rest with values that do no harm (context length 0, the null slot).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

StepFn = Callable[[dict[str, torch.Tensor]], torch.Tensor]


class CudaGraphRunner:
    """Captures `step(buffers_view) -> output` for each bucket and replays it.

    `buffers`: name -> static tensor sized for the largest bucket, batch along `batch_dims[name]`
    (default 0). `pad_values`: what rows past the live batch hold (default 0). The step function
    must only read these views and allocate through torch (captured allocations come from the
    graph's private pool, shared by all buckets).
    """

    def __init__(
        self,
        step: StepFn,
        buffers: dict[str, torch.Tensor],
        batch_sizes: list[int],
        batch_dims: dict[str, int] | None = None,
        pad_values: dict[str, float] | None = None,
    ):
        self.step = step
        self.buffers = buffers
        self.batch_sizes = sorted(set(batch_sizes))
        self.batch_dims = batch_dims or {}
        self.pad_values = pad_values or {}
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.capture_seconds = 0.0
        max_bs = self.batch_sizes[-1]
        for name, buf in buffers.items():
            if buf.shape[self.batch_dims.get(name, 0)] < max_bs:
                raise ValueError(f"buffer '{name}' holds fewer than {max_bs} rows")

    @property
    def max_batch_size(self) -> int:
        return self.batch_sizes[-1]

    def bucket_for(self, batch: int) -> int | None:
        """The smallest captured bucket that holds `batch` rows, or None if none does."""
        for size in self.batch_sizes:
            if size >= batch:
                return size
        return None

    def views(self, batch: int) -> dict[str, torch.Tensor]:
        """The first `batch` rows of every buffer."""
        return {
            name: buf.narrow(self.batch_dims.get(name, 0), 0, batch)
            for name, buf in self.buffers.items()
        }

    def capture(self, warmup: int = 2) -> float:
        """Capture a graph per bucket, largest first (so smaller ones reuse its memory).
        Returns the seconds it took."""
        start = time.perf_counter()
        for name in self.buffers:
            self._pad(name, 0, self.max_batch_size)
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for size in reversed(self.batch_sizes):
                views = self.views(size)
                for _ in range(warmup):
                    self.step(views)
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        for size in reversed(self.batch_sizes):
            views = self.views(size)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[size] = self.step(views)
            self.graphs[size] = graph
        torch.cuda.synchronize()
        self.capture_seconds = time.perf_counter() - start
        return self.capture_seconds

    def replay(self, batch: int) -> torch.Tensor:
        """Run the step for the first `batch` rows already written into the buffers; rows up to
        the bucket are padded here. Returns a view of the static output (valid until the next
        replay): its first `batch` rows along dim 0."""
        size = self.bucket_for(batch)
        if size is None or size not in self.graphs:
            raise ValueError(f"no captured graph holds a batch of {batch} (buckets {self.batch_sizes})")
        if batch < size:
            for name in self.buffers:
                self._pad(name, batch, size)
        self.graphs[size].replay()
        return self.outputs[size][:batch]

    def run(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Copy the step's inputs (a subset of the buffers, `batch` rows each) in and replay."""
        batch = None
        for name, value in inputs.items():
            dim = self.batch_dims.get(name, 0)
            batch = value.shape[dim]
            self.buffers[name].narrow(dim, 0, batch).copy_(value, non_blocking=True)
        if batch is None:
            raise ValueError("run needs at least one input")
        return self.replay(batch)

    def _pad(self, name: str, start: int, end: int) -> None:
        buf = self.buffers[name]
        buf.narrow(self.batch_dims.get(name, 0), start, end - start).fill_(self.pad_values.get(name, 0))
