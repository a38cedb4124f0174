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
from models.engine.device import pick_device, pick_dtype, to_device
from models.engine.hidden_capture import CapturePlan, LayerCapture
from models.engine.llama import LlamaForCausalLM, load_llama
from models.engine.scheduler import ScheduledSequence

GIB = 1 << 30


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
        self.hidden: torch.Tensor | None = None  # the last step's capture [layers, rows, hidden]
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

    @torch.inference_mode()
    def copy_block(self, src: int, dst: int) -> None:
        """Copy one KV-cache block's keys and values in every layer (prefix caching's
        copy-on-write of a shared block a rewound sequence writes into)."""
        for attn in self.model.attention_layers():
            attn.k_cache[dst].copy_(attn.k_cache[src])
            attn.v_cache[dst].copy_(attn.v_cache[src])

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
        logit_counts: list[int] | None = None,
        plan: CapturePlan | None = None,
    ) -> torch.Tensor:
        """Run one step; float32 logits [rows, vocab] at each row's last new token, or with
        `logit_counts` at each row's last logit_counts[row] new tokens, rows after another
        (speculative decoding's verify step). With a capture `plan`, `self.hidden` becomes the
        residual stream after its layers at the same positions (or each row's last
        `plan.counts` new tokens), [layers, tokens, hidden] (valid until the next step; else
        None)."""
        self.hidden = None
        capture_layers = plan.layers if plan is not None else None
        if logit_counts is not None:  # a verify step: capturing rows are not speculated
            input_ids, positions, batch = self.prepare(scheduled, steer_deltas, lora_weights)
            hidden = self.model(input_ids, positions, batch, self._capture(batch, plan))
            ends, picked = 0, []
            for item, n in zip(scheduled, logit_counts, strict=True):
                ends += item.num_tokens
                picked.extend(range(ends - n, ends))
            return self.model.compute_logits(
                hidden[to_device(picked, torch.int64, self.device)]
            ).float()
        if self.graphs is not None and all(item.num_tokens == 1 for item in scheduled):
            rows = self._decode_rows(scheduled)
            if self.graphs.holds(len(scheduled), rows[-1], capture_layers):
                row_inputs = self._row_inputs(steer_deltas, lora_weights)
                logits = self.graphs.run(
                    *rows, row_inputs["steer_deltas"], row_inputs["lora_weights"],
                    capture=capture_layers is not None,
                )  # fmt: skip
                if capture_layers is not None:
                    self.hidden = self.graphs.hidden_rows(capture_layers, len(scheduled))
                return logits
        input_ids, positions, batch = self.prepare(scheduled, steer_deltas, lora_weights)
        capture = self._capture(batch, plan)
        if batch.is_decode:
            return self.decode(input_ids, positions, batch, capture)
        hidden = self.model(input_ids, positions, batch, capture)
        last = batch.cu_seqlens_q[1:].long() - 1  # each row's last new token
        return self.model.compute_logits(hidden[last]).float()

    def _capture(self, batch: ForwardBatch, plan: CapturePlan | None) -> LayerCapture | None:
        """Where an eager forward copies the plan's layers (None: no capture); sets self.hidden."""
        if plan is None:
            return None
        out = torch.empty(
            len(plan.layers), sum(plan.counts or [len(batch.query_lens)]), self.args.hidden_size,
            dtype=self.dtype, device=self.device,
        )  # fmt: skip
        self.hidden = out
        return LayerCapture(plan.layers, out, self._capture_index(batch, plan))

    def _capture_index(self, batch: ForwardBatch, plan: CapturePlan) -> torch.Tensor | None:
        """The tokens a prefill step captures: each row's last, or its last plan.counts."""
        if batch.is_decode:
            return None
        if plan.counts is None:
            return batch.cu_seqlens_q[1:].long() - 1
        index, end = [], 0
        for n, k in zip(batch.query_lens, plan.counts, strict=True):
            end += n
            index.extend(range(end - k, end))
        return to_device(index, torch.int64, self.device)

    def decode(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        batch: ForwardBatch,
        capture: LayerCapture | None = None,
    ):
        """One token per row, static shapes: the function a CUDA graph captures."""
        hidden = self.model(input_ids, positions, batch, capture)
        return self.model.compute_logits(hidden).float()

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
            capture_layers=tuple(sorted(set(self.config.hidden_capture_layers))),
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
