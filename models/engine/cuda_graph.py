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

import numpy as np
import torch

from models.engine.attention import ForwardBatch
from models.engine.hidden_capture import LayerCapture
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

    def replay(self, batch: int, pad: bool = True) -> torch.Tensor:
        """Run the step for the first `batch` rows already written into the buffers; rows up to
        the bucket are padded here (unless the caller did: `pad` False). Returns a view of the
        static output (valid until the next replay): its first `batch` rows along dim 0."""
        size = self.bucket_for(batch)
        if size is None or size not in self.graphs:
            raise ValueError(
                f"no captured graph holds a batch of {batch} (buckets {self.batch_sizes})"
            )
        if pad and batch < size:
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


DecodeFn = Callable[[torch.Tensor, torch.Tensor, ForwardBatch, LayerCapture | None], torch.Tensor]


class StagedInputs:
    """The decode graphs' token inputs as views of one device buffer, filled from a pinned host
    mirror of the same layout: ids, positions, slots (int64 [rows]), context lengths (int32
    [rows]) and block tables (int32 [rows, max_blocks]).

    A step writes its rows into the mirror through numpy views (no torch tensor is built) and
    one non-blocking copy moves them, instead of a tensor, a staging copy and a device-side copy
    per input. Two mirrors alternate; each waits for its previous copy to finish before it is
    written again (in practice that copy ended a step ago)."""

    def __init__(self, rows: int, max_blocks: int, device: torch.device):
        self.rows, self.max_blocks = rows, max_blocks
        self.tables_at = 3 * rows * 8 + rows * 4  # byte offset of the block tables
        nbytes = self.tables_at + rows * max_blocks * 4
        self.device_bytes = torch.zeros(nbytes, dtype=torch.uint8, device=device)
        self.buffers = self._views(self.device_bytes)
        self.mirrors = [torch.zeros(nbytes, dtype=torch.uint8).pin_memory() for _ in range(2)]
        self.host = [{k: v.numpy() for k, v in self._views(m).items()} for m in self.mirrors]
        self.events: list[torch.cuda.Event | None] = [None, None]
        self.next = 0

    def _views(self, raw: torch.Tensor) -> dict[str, torch.Tensor]:
        rows = self.rows
        longs = raw[: 3 * rows * 8].view(torch.int64)
        ints = raw[3 * rows * 8 :].view(torch.int32)
        return {
            "ids": longs[:rows],
            "pos": longs[rows : 2 * rows],
            "slots": longs[2 * rows :],
            "ctx": ints[:rows],
            "tables": ints[rows:].view(rows, self.max_blocks),
        }

    def write(self, size: int, ids, positions, slots, tables: list[int], width: int) -> None:
        """Queue the step's rows (lists; `tables` flat, `width` entries per row) on the current
        stream; rows len(ids)..size-1 get zeros (context 0: they read nothing and write their
        K/V to the null slot 0)."""
        n = len(ids)
        i, self.next = self.next, 1 - self.next
        if self.events[i] is not None:
            self.events[i].synchronize()
        host = self.host[i]
        host["ids"][:n], host["pos"][:n], host["slots"][:n] = ids, positions, slots
        ctx = host["ctx"]
        ctx[:n] = positions
        ctx[:n] += 1
        if n < size:
            for name in ("ids", "pos", "slots", "ctx"):
                host[name][n:size] = 0
        host["tables"][:n, :width] = np.asarray(tables, dtype=np.int32).reshape(n, width)
        end = self.tables_at + n * self.max_blocks * 4
        self.device_bytes[:end].copy_(self.mirrors[i][:end], non_blocking=True)
        event = self.events[i] or torch.cuda.Event()
        event.record()
        self.events[i] = event


class DecodeGraphs:
    """The engine's decode step (`decode(ids, positions, ForwardBatch, capture) -> logits`) in
    CUDA graphs: static ForwardBatch buffers, a graph per batch bucket, captured once without
    and once with the per-row LoRA path (when the model has LoRA slots), and each of those once
    more copying the residual stream at `capture_layers` into a static buffer (when set: steps
    in which a row reads hidden states; steps in which none does replay the graphs without the
    copies). Steering deltas are always read (a zero delta costs one row read inside the fused
    norm), so steered and plain rows share a graph.

    Rows past the live batch in a bucket compute values nobody reads: every kernel keeps rows
    apart, their context length is 0 and their slot the null slot, so only the token inputs are
    padded (steering and LoRA rows there keep whatever they held).
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
        capture_layers: tuple[int, ...] = (),
    ):
        self.decode = decode
        max_bs = max(batch_sizes)
        self.max_blocks = max_blocks
        self.inputs = StagedInputs(max_bs, max_blocks, device)
        self.buffers = dict(
            self.inputs.buffers,
            steer=torch.zeros(num_layers, max_bs, hidden_size, dtype=dtype, device=device),
        )
        self.rows = torch.arange(max_bs, device=device)  # a decode batch's token_rows
        self.lora = torch.zeros(max_bs, max(lora_slots, 1), dtype=dtype, device=device)
        self.capture_layers = capture_layers
        self.hidden = torch.zeros(
            len(capture_layers), max_bs, hidden_size, dtype=dtype, device=device
        )
        self._layer_index: dict[tuple[int, ...], torch.Tensor] = {}
        self.steer_dirty = False
        self.steer_copied: torch.Tensor | None = None  # what the steer buffer holds now
        self.lora_copied: torch.Tensor | None = None  # what the lora buffer's rows hold now
        self.lora_rows = 0
        pool = torch.cuda.graph_pool_handle()
        stream = private_stream(device, owner=self)  # all variants: never replayed at once
        dims = {"steer": 1, "hidden": 1}
        self.runners: dict[tuple[bool, bool], CudaGraphRunner] = {}
        for lora in (False, True) if lora_slots else (False,):
            for capture in (False, True) if capture_layers else (False,):
                buffers = dict(self.buffers)
                if lora:
                    buffers["lora"] = self.lora
                if capture:
                    buffers["hidden"] = self.hidden
                self.runners[lora, capture] = CudaGraphRunner(
                    lambda v, lora=lora, capture=capture: self._step(v, lora, capture),
                    buffers, batch_sizes, dims, pool=pool, stream=stream,
                )  # fmt: skip
        self.plain = self.runners[False, False]

    def _step(self, views: dict[str, torch.Tensor], lora: bool, capture: bool) -> torch.Tensor:
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
        layers = LayerCapture(self.capture_layers, views["hidden"]) if capture else None
        return self.decode(views["ids"], views["pos"], batch, layers)

    def capture(self) -> float:
        """Capture every graph; returns the seconds it took."""
        return sum(runner.capture() for runner in self.runners.values())

    def holds(self, rows: int, width: int, layers: tuple[int, ...] | None = None) -> bool:
        """Whether a decode step of `rows` rows with block tables `width` wide, capturing
        `layers` (None: nothing), can replay."""
        if layers is not None and not set(layers) <= set(self.capture_layers):
            return False
        return rows <= self.plain.max_batch_size and width <= self.max_blocks

    def hidden_rows(self, layers: tuple[int, ...], rows: int) -> torch.Tensor:
        """The last replay's capture at `layers` (a subset of capture_layers) for its first
        `rows` rows: [layers, rows, hidden], a view of the static buffer when all are asked."""
        if layers == self.capture_layers:
            return self.hidden[:, :rows]
        index = self._layer_index.get(layers)
        if index is None:
            positions = [self.capture_layers.index(x) for x in layers]
            index = torch.tensor(positions, device=self.hidden.device)
            self._layer_index[layers] = index
        return self.hidden[index, :rows]

    def run(
        self,
        ids: list[int],
        positions: list[int],
        slots: list[int],
        tables: list[int],
        width: int,
        steer_deltas: torch.Tensor | None,
        lora_weights: torch.Tensor | None,
        capture: bool = False,
    ) -> torch.Tensor:
        """One decode step from host lists (`tables` flat, `width` per row) and device row
        tensors; returns logits [rows, vocab] (a view of the graph's output, valid until the
        next replay). `capture`: fill `hidden` at capture_layers too."""
        n = len(ids)
        size = self.plain.bucket_for(n)
        self.inputs.write(size, ids, positions, slots, tables, width)
        steer = self.buffers["steer"]
        if steer_deltas is None:
            if self.steer_dirty:
                steer.zero_()
                self.steer_dirty = False
            self.steer_copied = None
        elif self.steer_copied is not steer_deltas:  # the engine reuses unchanged deltas
            steer[:, :n].copy_(steer_deltas)
            self.steer_dirty = True
            self.steer_copied = steer_deltas
        lora = lora_weights is not None and (True, False) in self.runners
        if lora and (self.lora_copied is not lora_weights or self.lora_rows != n):
            self.lora[:n].copy_(lora_weights)  # else: the same tensor as last time
            self.lora_copied, self.lora_rows = lora_weights, n
        return self.runners[lora, capture].replay(n, pad=False)
