"""Runs the model for one scheduled step: builds the flat batch, owns the KV cache.

`decode(...)` is the static-shape entry a CUDA-graph runner captures: every input is a tensor
whose shape depends only on the batch bucket (see models.engine.attention for the layout).
"""

from __future__ import annotations

from pathlib import Path

import torch

from models.engine.attention import ForwardBatch
from models.engine.config import EngineConfig
from models.engine.cuda_graph import DecodeGraphs
from models.engine.llama import LlamaForCausalLM, load_llama
from models.engine.scheduler import ScheduledSequence

GIB = 1 << 30


def pick_device(config: EngineConfig) -> torch.device:
    if config.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(config.device)


def pick_dtype(config: EngineConfig, device: torch.device) -> torch.dtype:
    if config.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, config.dtype)


def to_device(data: list | torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Host data as a tensor on `device` without a host sync: on CUDA it goes through pinned
    memory and a non-blocking copy (a plain `torch.tensor(..., device="cuda")` waits for all
    queued GPU work first, which would serialise the step's host work behind the GPU)."""
    cpu = data.to(dtype) if isinstance(data, torch.Tensor) else torch.tensor(data, dtype=dtype)
    if device.type != "cuda":
        return cpu.to(device)
    return cpu.pin_memory().to(device, non_blocking=True)


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
        ids, positions, slots, rows, query_lens, context_lens = [], [], [], [], [], []
        for row, item in enumerate(scheduled):
            seq, start = item.seq, item.seq.num_computed
            end = start + item.num_tokens
            ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            slots.extend(
                seq.block_table[p // self.block_size] * self.block_size + p % self.block_size
                for p in range(start, end)
            )
            rows.extend([row] * item.num_tokens)
            query_lens.append(item.num_tokens)
            context_lens.append(end)
        max_blocks = max(len(item.seq.block_table) for item in scheduled)
        tables = []
        for item in scheduled:
            table = item.seq.block_table
            tables.extend(table)
            tables.extend([0] * (max_blocks - len(table)))
        # two host->device copies per step, neither waiting for the GPU (see to_device)
        n_tok, n_rows = len(ids), len(scheduled)
        longs = to_device(ids + positions + slots + rows, torch.int64, self.device)
        ints = to_device(context_lens + tables, torch.int32, self.device)
        batch = ForwardBatch(
            is_decode=all(n == 1 for n in query_lens),
            slot_mapping=longs[2 * n_tok : 3 * n_tok],
            block_tables=ints[n_rows:].view(n_rows, max_blocks),
            context_lens=ints[:n_rows],
            query_lens=query_lens,
            token_rows=longs[3 * n_tok :],
            steer_deltas=None if steer_deltas is None else steer_deltas.to(self.device, self.dtype),
            lora_weights=None
            if lora_weights is None
            else to_device(lora_weights, self.dtype, self.device),
        )
        return longs[:n_tok], longs[n_tok : 2 * n_tok], batch

    @torch.inference_mode()
    def run(
        self,
        scheduled: list[ScheduledSequence],
        steer_deltas: torch.Tensor | None = None,
        lora_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run one step; float32 logits [rows, vocab] at each row's last new token."""
        input_ids, positions, batch = self.prepare(scheduled, steer_deltas, lora_weights)
        if batch.is_decode:
            if self.graphs is not None and self.graphs.fits(batch):
                return self.graphs.run(input_ids, positions, batch)
            return self.decode(input_ids, positions, batch)
        hidden = self.model(input_ids, positions, batch)
        last = to_device(batch.query_lens, torch.int64, self.device).cumsum(0) - 1
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
