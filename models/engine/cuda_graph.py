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

from models.engine.attention import ForwardBatch
from models.engine.streams import private_stream

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
        pool: tuple | None = None,
        stream: torch.cuda.Stream | None = None,
    ):
        self.step = step
        self.stream = stream  # capture stream: one no concurrently replayed graph shares
        self.buffers = buffers
        self.batch_sizes = sorted(set(batch_sizes))
        self.batch_dims = batch_dims or {}
        self.pad_values = pad_values or {}
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.capture_seconds = 0.0
        self.pool = pool
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
        The buffers hold padding while the step runs for capture and get their contents back
        afterwards. Returns the seconds it took."""
        start = time.perf_counter()
        saved = {name: buf.clone() for name, buf in self.buffers.items()}
        for name in self.buffers:
            self._pad(name, 0, self.max_batch_size)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        pool = self.pool
        if self.stream is None:
            self.stream = private_stream(self.buffers_device(), owner=self)
        stream = self.stream
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
            with torch.cuda.graph(graph, pool=pool, stream=stream):
                self.outputs[size] = self.step(views)
            self.graphs[size] = graph
        for name, buf in self.buffers.items():
            buf.copy_(saved[name])
        torch.cuda.synchronize()
        self.capture_seconds = time.perf_counter() - start
        return self.capture_seconds

    def buffers_device(self) -> torch.device:
        return next(iter(self.buffers.values())).device

    def replay(self, batch: int) -> torch.Tensor:
        """Run the step for the first `batch` rows already written into the buffers; rows up to
        the bucket are padded here. Returns a view of the static output (valid until the next
        replay): its first `batch` rows along dim 0."""
        size = self.bucket_for(batch)
        if size is None or size not in self.graphs:
            raise ValueError(
                f"no captured graph holds a batch of {batch} (buckets {self.batch_sizes})"
            )
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
        buf.narrow(self.batch_dims.get(name, 0), start, end - start).fill_(
            self.pad_values.get(name, 0)
        )


DecodeFn = Callable[[torch.Tensor, torch.Tensor, ForwardBatch], torch.Tensor]


class DecodeGraphs:
    """The engine's decode step (`decode(ids, positions, ForwardBatch) -> logits`) in CUDA
    graphs: static ForwardBatch buffers, a graph per batch bucket, captured once without and
    once with the per-row LoRA path (when the model has LoRA slots). Steering deltas are always
    read (a zero delta costs one row read inside the fused norm), so steered and plain rows
    share a graph.
    """

    def __init__(
        self,
        decode: DecodeFn,
        batch_sizes: list[int],
        max_blocks: int,
        num_layers: int,
        hidden_size: int,
        lora_slots: int,
        device: torch.device,
        dtype: torch.dtype,
    ):
        self.decode = decode
        max_bs = max(batch_sizes)
        self.max_blocks = max_blocks
        rows = torch.arange(max_bs, device=device)
        self.buffers = {
            "ids": torch.zeros(max_bs, dtype=torch.int64, device=device),
            "pos": torch.zeros(max_bs, dtype=torch.int64, device=device),
            "slots": torch.zeros(max_bs, dtype=torch.int64, device=device),
            "tables": torch.zeros(max_bs, max_blocks, dtype=torch.int32, device=device),
            "ctx": torch.zeros(max_bs, dtype=torch.int32, device=device),
            "steer": torch.zeros(num_layers, max_bs, hidden_size, dtype=dtype, device=device),
        }
        self.rows = rows  # token_rows of a decode batch: the identity, never padded
        self.lora = torch.zeros(max_bs, max(lora_slots, 1), dtype=dtype, device=device)
        self.steer_dirty = False
        self.steer_copied: torch.Tensor | None = None  # what the steer buffer holds now
        self.lora_copied: torch.Tensor | None = None  # what the lora buffer's rows hold now
        self.lora_rows = 0
        pool = torch.cuda.graph_pool_handle()
        stream = private_stream(device, owner=self)  # both variants: never replayed at once
        dims = {"steer": 1}
        self.plain = CudaGraphRunner(
            lambda v: self._step(v, lora=False),
            self.buffers,
            batch_sizes,
            dims,
            pool=pool,
            stream=stream,
        )
        self.with_lora = None
        if lora_slots:
            self.with_lora = CudaGraphRunner(
                lambda v: self._step(v, lora=True),
                dict(self.buffers, lora=self.lora),
                batch_sizes,
                dims,
                pool=pool,
                stream=stream,
            )

    def _step(self, views: dict[str, torch.Tensor], lora: bool) -> torch.Tensor:
        rows = views["ids"].shape[0]
        batch = ForwardBatch(
            is_decode=True,
            slot_mapping=views["slots"],
            block_tables=views["tables"],
            context_lens=views["ctx"],
            query_lens=[1] * rows,
            token_rows=self.rows[:rows],
            steer_deltas=views["steer"],
            lora_weights=views["lora"] if lora else None,
        )
        return self.decode(views["ids"], views["pos"], batch)

    def capture(self) -> float:
        """Capture every graph; returns the seconds it took."""
        seconds = self.plain.capture()
        if self.with_lora is not None:
            seconds += self.with_lora.capture()
        return seconds

    def fits(self, batch: ForwardBatch) -> bool:
        """Whether a decode batch can be replayed (a bucket holds it and its tables fit)."""
        return (
            batch.is_decode
            and batch.context_lens.shape[0] <= self.plain.max_batch_size
            and batch.block_tables.shape[1] <= self.max_blocks
        )

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch):
        """Copy the step into the static buffers and replay; returns logits [rows, vocab]
        (a view of the graph's output, valid until the next replay)."""
        n = input_ids.shape[0]
        b = self.buffers
        b["ids"][:n].copy_(input_ids)
        b["pos"][:n].copy_(positions)
        b["slots"][:n].copy_(batch.slot_mapping)
        b["ctx"][:n].copy_(batch.context_lens)
        b["tables"][:n, : batch.block_tables.shape[1]].copy_(batch.block_tables)
        if batch.steer_deltas is None:
            if self.steer_dirty:
                b["steer"].zero_()
                self.steer_dirty = False
            self.steer_copied = None
        elif self.steer_copied is not batch.steer_deltas:  # the engine reuses unchanged deltas
            b["steer"][:, :n].copy_(batch.steer_deltas)
            self.steer_dirty = True
            self.steer_copied = batch.steer_deltas
        if batch.lora_weights is not None and self.with_lora is not None:
            if self.lora_copied is not batch.lora_weights or self.lora_rows != n:
                self.lora[:n].copy_(batch.lora_weights)  # else: the same tensor as last time
                self.lora_copied, self.lora_rows = batch.lora_weights, n
            return self.with_lora.replay(n)
        return self.plain.replay(n)
