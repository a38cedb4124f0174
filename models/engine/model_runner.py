"""Runs the model for one scheduled step: builds the flat batch, owns the KV cache.

`decode(...)` is the static-shape entry a CUDA-graph runner captures: every input is a tensor
whose shape depends only on the batch bucket (see models.engine.attention for the layout).
"""

from __future__ import annotations

import math
import threading
from pathlib import Path

import torch

from models.engine.attention import ForwardBatch
from models.engine.config import EngineConfig
from models.engine.cuda_graph import DecodeGraphs
from models.engine.llama import LlamaForCausalLM, load_llama
from models.engine.scheduler import ScheduledSequence

GIB = 1 << 30


def pick_device(config: EngineConfig) -> torch.device:
    """The configured device; a GPU with its index (the current one when none is given), so
    that it compares equal to the device of the tensors made on it."""
    name = config.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def pick_dtype(config: EngineConfig, device: torch.device) -> torch.dtype:
    if config.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, config.dtype)


def to_device(data: list | torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Host data as a tensor on `device` without a host sync: on CUDA it goes through pinned
    memory and a non-blocking copy (a plain `torch.tensor(..., device="cuda")` waits for all
    queued GPU work first, which would serialise the step's host work behind the GPU). The
    pinned memory is a reused staging buffer (see PinnedStaging), not a new pinned allocation
    per call."""
    if isinstance(data, torch.Tensor) and is_on(data, device):
        return data.to(dtype)
    if device.type != "cuda":
        cpu = data.to(dtype) if isinstance(data, torch.Tensor) else torch.tensor(data, dtype=dtype)
        return cpu.to(device)
    return _staging(device).copy(data, dtype)


def is_on(tensor: torch.Tensor, device: torch.device) -> bool:
    """Whether `tensor` lives on `device` ("cuda" without an index meaning the current one:
    torch.device("cuda") != torch.device("cuda:0"), though both name the same GPU)."""
    if tensor.device.type != device.type:
        return False
    if device.index is None and device.type == "cuda":
        return tensor.device.index == torch.cuda.current_device()
    return tensor.device.index == device.index


NUMPY_DTYPES = (torch.int64, torch.int32, torch.float32, torch.float64)


class PinnedStaging:
    """A ring of pinned host buffers for host->device copies on one device. Each copy takes
    the next buffer (grown when too small), fills it, and queues a non-blocking copy on the
    current stream; an event tells when that buffer may be filled again (with enough buffers
    in the ring the host never waits: the GPU finished those copies steps ago). A flat list of
    numbers is written through a numpy view of the buffer, several times cheaper than building
    a torch tensor from it."""

    def __init__(self, device: torch.device, slots: int = 16, min_bytes: int = 1 << 16):
        self.device = device
        self.lock = threading.Lock()  # the engine thread and a colocated steerer's share it
        self.min_bytes = min_bytes
        self.buffers: list[torch.Tensor | None] = [None] * slots
        self.events: list[torch.cuda.Event | None] = [None] * slots
        self.next = 0

    def copy(self, data: list | torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        flat = (
            isinstance(data, list)
            and dtype in NUMPY_DTYPES
            and not (data and isinstance(data[0], (list, tuple)))
        )
        if flat:
            cpu, shape = None, (len(data),)
        else:
            cpu = data.to(dtype) if isinstance(data, torch.Tensor) else torch.tensor(data, dtype=dtype)
            cpu, shape = cpu.contiguous(), cpu.shape
        nbytes = math.prod(shape) * dtype.itemsize
        with self.lock:
            i = self.next
            self.next = (i + 1) % len(self.buffers)
            if self.events[i] is not None:
                self.events[i].synchronize()  # its last copy is done (at once, in practice)
            buf = self.buffers[i]
            if buf is None or buf.numel() < nbytes:
                size = max(nbytes, self.min_bytes)
                buf = self.buffers[i] = torch.empty(size, dtype=torch.uint8, pin_memory=True)
            staged = buf[:nbytes].view(dtype).view(shape)
            if cpu is None:
                staged.numpy()[:] = data
            else:
                staged.copy_(cpu)
            out = staged.to(self.device, non_blocking=True)
            event = self.events[i] or torch.cuda.Event()
            event.record()
            self.events[i] = event
        return out


_stagings: dict[tuple[str, int | None], PinnedStaging] = {}


def _staging(device: torch.device) -> PinnedStaging:
    index = device.index if device.index is not None else torch.cuda.current_device()
    key = (device.type, index)
    if key not in _stagings:
        _stagings[key] = PinnedStaging(torch.device(device.type, index))
    return _stagings[key]


def stack_rows(rows: list[torch.Tensor]) -> torch.Tensor:
    """torch.stack(rows), but without a copy when the rows are views of one tensor at evenly
    spaced offsets (rows of a batch's logits, every other row of a base + expert read): then
    it is a strided view of that tensor. Reading it is the same; writing would reach the
    original, so callers only read."""
    first = rows[0]
    if len(rows) == 1:
        return first.unsqueeze(0)
    # rows at evenly spaced addresses with one layout are exactly the strided view below (and
    # as_strided refuses a view past the first row's storage: then it is a copy after all)
    ptr, size = first.data_ptr(), first.element_size()
    gap = rows[1].data_ptr() - ptr
    shape, stride = first.shape, first.stride()
    if gap > 0 and gap % size == 0 and all(
        r.data_ptr() == ptr + i * gap and r.shape == shape and r.stride() == stride
        for i, r in enumerate(rows)
    ) and all(r.dtype == first.dtype for r in rows):
        try:
            return first.as_strided(
                (len(rows), *shape), (gap // size, *stride), first.storage_offset()
            )
        except RuntimeError:
            pass
    return torch.stack(rows)


def padded_tables(seqs: list) -> tuple[list[int], int]:
    """The rows' block tables as one flat list, each padded with the null block 0 to the
    widest, and that width."""
    width = max(len(s.block_table) for s in seqs)
    tables = []
    for s in seqs:
        tables += s.block_table
        if len(s.block_table) < width:
            tables += [0] * (width - len(s.block_table))
    return tables, width


def _aligned(n: int, multiple: int) -> int:
    """n rounded up to a multiple."""
    return -(-n // multiple) * multiple


class ModelRunner:
    """The model, its paged KV cache, and the conversion of a schedule into tensors."""

    def __init__(self, config: EngineConfig, model_path: str | Path, max_model_len: int):
        self.config = config
        self.device = pick_device(config)
        self.dtype = pick_dtype(config, self.device)
        self.model: LlamaForCausalLM = load_llama(
            model_path, self.device, self.dtype, max_model_len
        )
        self.args = self.model.args
        self.block_size = config.block_size
        self.num_blocks = self._num_kv_blocks()
        self._allocate_kv_cache()
        self.max_model_len = max_model_len
        self.graphs: DecodeGraphs | None = None
        self._arange = torch.arange(max(config.max_num_seqs, 1), device=self.device)

    def _block_bytes(self) -> int:
        a = self.args
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * a.num_layers * self.block_size * a.num_kv_heads * a.head_dim * elem

    def _num_kv_blocks(self) -> int:
        if self.config.num_kv_blocks is not None:
            return self.config.num_kv_blocks
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            budget = free * self.config.kv_cache_memory_fraction
        else:
            budget = self.config.kv_cache_cpu_gib * GIB
        return max(2, int(budget // self._block_bytes()))

    def _allocate_kv_cache(self) -> None:
        a = self.args
        shape = (self.num_blocks, self.block_size, a.num_kv_heads, a.head_dim)
        for attn in self.model.attention_layers():
            attn.k_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
            attn.v_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)

    def prepare(
        self,
        scheduled: list[ScheduledSequence],
        steer_deltas: torch.Tensor | None,
        lora_weights: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, ForwardBatch]:
        """Token ids, positions and the ForwardBatch of one step (rows in schedule order)."""
        if all(item.num_tokens == 1 for item in scheduled):
            return self._prepare_decode(scheduled, steer_deltas, lora_weights)
        ids, positions, slots, rows, query_lens, context_lens = [], [], [], [], [], []
        cu_seqlens = [0]
        for row, item in enumerate(scheduled):
            seq, start = item.seq, item.seq.num_computed
            end = start + item.num_tokens
            ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            slots.extend(self._slots(seq.block_table, start, end))
            rows.extend([row] * item.num_tokens)
            query_lens.append(item.num_tokens)
            cu_seqlens.append(cu_seqlens[-1] + item.num_tokens)
            context_lens.append(end)
        tables, max_blocks = padded_tables([item.seq for item in scheduled])
        # two host->device copies per step, neither waiting for the GPU (see to_device); each
        # part starts 16-byte aligned, since Triton compiles a kernel variant per pointer
        # alignment and an odd row count would otherwise cost a compile mid-run
        n_tok, n_rows = len(ids), len(scheduled)
        t, pad = _aligned(n_tok, 2), [0] * (_aligned(n_tok, 2) - n_tok)
        longs = to_device(
            ids + pad + positions + pad + slots + pad + rows, torch.int64, self.device
        )
        r, c = _aligned(n_rows, 4), _aligned(n_rows + 1, 4)
        ints = to_device(
            context_lens + [0] * (r - n_rows) + cu_seqlens + [0] * (c - n_rows - 1) + tables,
            torch.int32,
            self.device,
        )
        batch = ForwardBatch(
            is_decode=all(n == 1 for n in query_lens),
            slot_mapping=longs[2 * t : 2 * t + n_tok],
            block_tables=ints[r + c :].view(n_rows, max_blocks),
            context_lens=ints[:n_rows],
            query_lens=query_lens,
            token_rows=longs[3 * t : 3 * t + n_tok],
            cu_seqlens_q=ints[r : r + n_rows + 1],
            max_query_len=max(query_lens),
            **self._row_inputs(steer_deltas, lora_weights),
        )
        return longs[:n_tok], longs[t : t + n_tok], batch

    def _slots(self, table: list[int], start: int, end: int) -> list[int]:
        """Cache slots of positions start..end-1: one range per block, not a loop per token
        (a prefill step has thousands of tokens)."""
        bs, slots = self.block_size, []
        for b in range(start // bs, (end - 1) // bs + 1):
            first, base = b * bs, table[b] * bs
            lo, hi = max(start, first) - first, min(end, first + bs) - first
            slots.extend(range(base + lo, base + hi))
        return slots

    def _prepare_decode(
        self,
        scheduled: list[ScheduledSequence],
        steer_deltas: torch.Tensor | None,
        lora_weights: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, ForwardBatch]:
        """`prepare` for a step where every row adds one token."""
        ids, positions, slots, tables, width = self._decode_rows(scheduled)
        n = len(ids)
        longs = to_device(ids + positions + slots, torch.int64, self.device)
        ints = to_device([p + 1 for p in positions] + tables, torch.int32, self.device)
        batch = ForwardBatch(
            is_decode=True,
            slot_mapping=longs[2 * n :],
            block_tables=ints[n:].view(n, width),
            context_lens=ints[:n],
            query_lens=[1] * n,
            token_rows=self._rows(n),
            **self._row_inputs(steer_deltas, lora_weights),
        )
        return longs[:n], longs[n : 2 * n], batch

    def _decode_rows(
        self, scheduled: list[ScheduledSequence]
    ) -> tuple[list[int], list[int], list[int], list[int], int]:
        """A decode step's host inputs: token ids, positions, cache slots, the block tables
        (flat, each row padded with the null block to the widest) and their width. Kept lean:
        it is host time on every decode step."""
        bs = self.block_size
        seqs = [item.seq for item in scheduled]
        positions = [s.num_computed for s in seqs]
        ids = [s.token_ids[p] for s, p in zip(seqs, positions, strict=True)]
        slots = [s.block_table[p // bs] * bs + p % bs for s, p in zip(seqs, positions, strict=True)]
        tables, width = padded_tables(seqs)
        return ids, positions, slots, tables, width

    def _row_inputs(self, steer_deltas: torch.Tensor | None, lora_weights: torch.Tensor | None):
        """ForwardBatch's per-row steering deltas and LoRA weights, on the device."""
        return {
            "steer_deltas": None
            if steer_deltas is None
            else steer_deltas.to(self.device, self.dtype),
            "lora_weights": None
            if lora_weights is None
            else to_device(lora_weights, self.dtype, self.device),
        }

    def _rows(self, n: int) -> torch.Tensor:
        """0..n-1 on the device (a decode batch's token_rows), from one cached arange."""
        if self._arange.shape[0] < n:
            self._arange = torch.arange(max(n, 2 * self._arange.shape[0]), device=self.device)
        return self._arange[:n]

    @torch.inference_mode()
    def run(
        self,
        scheduled: list[ScheduledSequence],
        steer_deltas: torch.Tensor | None = None,
        lora_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run one step; float32 logits [rows, vocab] at each row's last new token."""
        if self.graphs is not None and all(item.num_tokens == 1 for item in scheduled):
            rows = self._decode_rows(scheduled)
            if self.graphs.holds(len(scheduled), rows[-1]):  # the host lists go straight in
                row_inputs = self._row_inputs(steer_deltas, lora_weights)
                return self.graphs.run(*rows, row_inputs["steer_deltas"], row_inputs["lora_weights"])
        input_ids, positions, batch = self.prepare(scheduled, steer_deltas, lora_weights)
        if batch.is_decode:
            return self.decode(input_ids, positions, batch)
        hidden = self.model(input_ids, positions, batch)
        last = batch.cu_seqlens_q[1:].long() - 1  # each row's last new token
        return self.model.compute_logits(hidden[last]).float()

    def decode(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch):
        """One token per row, static shapes: the function a CUDA graph captures."""
        return self.model.compute_logits(self.model(input_ids, positions, batch)).float()

    @torch.inference_mode()
    def capture_graphs(self) -> float:
        """Capture the decode step in CUDA graphs (CUDA with cuda_graphs on; call once the
        LoRA slots exist). Returns the seconds it took, 0 when nothing was captured."""
        if self.device.type != "cuda" or not self.config.cuda_graphs:
            return 0.0
        lora_slots = 0
        for layer, _ in self.model.lora_linears().values():
            if layer.lora_a is not None:
                lora_slots = layer.lora_a.shape[1] // (len(layer.part_sizes) * layer.rank)
        self.graphs = DecodeGraphs(
            self.decode,
            self._graph_batch_sizes(),
            max_blocks=-(-self.max_model_len // self.block_size),
            num_layers=self.args.num_layers,
            hidden_size=self.args.hidden_size,
            lora_slots=lora_slots,
            device=self.device,
            dtype=self.dtype,
        )
        return self.graphs.capture()

    def _graph_batch_sizes(self) -> list[int]:
        """The configured buckets up to the first that holds max_num_seqs rows."""
        sizes = []
        for size in sorted(self.config.cuda_graph_batch_sizes):
            sizes.append(size)
            if size >= self.config.max_num_seqs:
                break
        return sizes
