"""The small model on the torch engine's own model runner: paged KV cache, per-row LoRA slots.

Same interface as `SmallModel` (read / base_hidden_states / check_variant / free), for the
Llama-family checkpoints the engine loads natively. Every (request, variant) pair is one
sequence in the runner's paged cache; one step runs all pairs that have unread tokens in one
forward, the expert rows and base rows told apart only by their LoRA slot weights. Hidden
states, when a policy needs them, are read by hooks on the decoder blocks at each row's last
token.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from models.steering.state import BASE, RequestState, SmallOutput

MAX_ROWS = 128  # (request, variant) rows in one decode step that CUDA graphs cover
MAX_LEN_DEFAULT = 16384  # tokens per sequence when the big model's context is not given


@dataclass(eq=False)
class PagedKV:
    """One request's cache in one variant: the tokens it holds and their blocks. Duck-types the
    engine Sequence fields the model runner and block manager read."""

    token_ids: list[int] = field(default_factory=list)
    num_computed: int = 0
    block_table: list[int] = field(default_factory=list)
    read: int = 0  # the last read that scheduled it (a pair listed twice is read once)

    @property
    def length(self) -> int:
        return self.num_computed

    def crop(self, length: int) -> None:
        self.num_computed = min(self.num_computed, max(length, 0))


class PagedSmallModel:
    """The steering model run by models.engine.model_runner.ModelRunner.

    path: checkpoint directory (Llama family). adapters: variant name -> PEFT adapter directory.
    kv_cache_gib: size of its own paged KV cache.
    """

    def __init__(
        self,
        path: str,
        adapters: dict[str, str] | None = None,
        device: str = "auto",
        dtype: str = "auto",
        kv_cache_gib: float = 1.0,
        block_size: int = 16,
        max_model_len: int | None = None,
    ):
        from models.engine.adapters import LoRAAdapters
        from models.engine.block_manager import BlockManager
        from models.engine.config import EngineConfig
        from models.engine.model_runner import ModelRunner

        adapters = dict(adapters or {})
        self.path = path
        self.config_dict = json.loads((Path(path) / "config.json").read_text())
        # the block tables and the attention grid of its decode graphs are sized for this, so
        # it should be what the big model reads, not the small checkpoint's own limit
        max_len = max_model_len or min(
            int(self.config_dict.get("max_position_embeddings", 4096)), MAX_LEN_DEFAULT
        )
        self.max_len = max_len
        config = EngineConfig(
            device=device,
            dtype=dtype,
            block_size=block_size,
            kv_cache_cpu_gib=kv_cache_gib,
            max_adapters_per_replica=len(adapters),
            max_num_seqs=MAX_ROWS,
            max_lora_rank=max([_lora_rank(p) for p in adapters.values()] or [1]),
        )
        self.runner = ModelRunner(
            config.model_copy(update={"num_kv_blocks": _num_blocks(path, config, kv_cache_gib)}),
            path,
            max_len,
        )
        self.device = self.runner.device
        self.num_layers = self.runner.args.num_layers
        self.vocab_size = self.runner.args.vocab_size
        self.blocks = BlockManager(self.runner.num_blocks, block_size)
        self.lora = LoRAAdapters(self.runner.model, config)
        for name, adapter_path in adapters.items():
            self.lora.load(name, adapter_path)
        self.lora.drop_unused_linears()  # e.g. an expert on attention only: no MLP LoRA kernels
        self.variants = [BASE, *adapters]
        self._reads = 0
        self._lora_rows: tuple[tuple[str, ...], torch.Tensor | None] = ((), None)
        self.tokenizer = _tokenizer(path)
        # background reads run here, beside the big model's work on the default stream
        self.side_stream = None
        if self.device.type == "cuda":
            from models.engine.streams import private_stream

            # high priority: the step waits for the small model, which starts after the big one
            self.side_stream = private_stream(self.device, owner=self, priority=-1)
        self.reads_in_background = self.side_stream is not None
        if hasattr(self.runner, "capture_graphs"):  # CUDA: decode steps replay from graphs
            self.runner.capture_graphs()

    def check_variant(self, variant: str) -> None:
        if variant not in self.variants:
            raise ValueError(
                f"small-model variant '{variant}' is not loaded; loaded: {', '.join(self.variants)}"
            )

    def free(self, state: RequestState) -> None:
        """Return the request's cache blocks."""
        for kv in state.kv.values():
            if isinstance(kv, PagedKV):
                self.blocks.release(kv)
        state.kv.clear()

    def base_hidden_states(self, texts: list[str], pool: str = "last") -> torch.Tensor:
        """Each block's output at the last token of each text ("last") or averaged over its
        tokens ("mean"), without LoRA: float32 [num_texts, num_blocks, hidden]."""
        if self.tokenizer is None:
            raise ValueError(f"the small model {self.path} has no tokenizer to read texts with")
        states = [RequestState(f"text-{i}", None) for i in range(len(texts))]
        for state, text in zip(states, texts, strict=True):
            state.reset(self.tokenizer(text).input_ids, [])
        try:
            self.read([(s, BASE) for s in states], hidden_layers=range(self.num_layers))
            rows = []
            for state in states:
                per_block = state.outputs[BASE].hidden
                pooled = [per_block[b][-1] if pool == "last" else per_block[b].mean(0)
                          for b in range(self.num_layers)]  # fmt: skip
                rows.append(torch.stack(pooled))
            return torch.stack(rows).cpu()
        finally:
            for state in states:
                self.free(state)

    def read(
        self,
        items: list[tuple[RequestState, str]],
        hidden_layers: Sequence[int] = (),
        background: bool = False,
    ) -> None:
        """Make `state.output(variant)` current for every pair, in one forward; `hidden_layers`
        also keeps those blocks' outputs for the tokens read.

        On CUDA the forward runs on a side stream, so it overlaps whatever the big model still
        has queued on the main stream (the small model's inputs are host-side token ids, never
        the big model's results); the main stream waits for it before anything there can read
        the outputs, and the host never waits. `background` is the same without that wait: the
        next read (or `sync`) orders it."""
        if self.side_stream is None:
            return self._read(items, hidden_layers)
        main = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self.side_stream):
            outputs = self._read(items, hidden_layers)
        for tensor in outputs:  # made on the side stream, read on main: keep them alive there
            tensor.record_stream(main)
        if not background:
            main.wait_stream(self.side_stream)

    @torch.inference_mode()
    def _read(
        self, items: list[tuple[RequestState, str]], hidden_layers: Sequence[int]
    ) -> list[torch.Tensor]:
        """The forward in the current stream; returns the tensors it made for the outputs."""
        rows, scheduled = self._stale_rows(items)
        if not rows:
            return []
        captured = self._capture_hidden(hidden_layers) if hidden_layers else None
        graphs = getattr(self.runner, "graphs", None)
        try:
            if captured is not None:
                self.runner.graphs = None  # hooks only run in the eager forward
            logits = self.runner.run(scheduled, None, self._lora_weights(rows))
        finally:
            if captured is not None:
                self.runner.graphs = graphs
                for handle in captured["handles"]:
                    handle.remove()
        # a graph replay returns a view of its static output: keep one copy for all rows
        logits = logits.clone()
        made = [logits]
        start = 0
        for row, ((state, variant, kv), item) in enumerate(zip(rows, scheduled, strict=True)):
            kv.num_computed = length = len(kv.token_ids)
            hidden = {}
            if captured is not None:
                end = start + item.num_tokens
                hidden = {layer: h[start:end].float() for layer, h in captured["hidden"].items()}
                made.extend(hidden.values())
                start = end
            state.outputs[variant] = SmallOutput(logits, row, length, hidden)
        return made

    def _stale_rows(
        self, items: list[tuple[RequestState, str]]
    ) -> tuple[list[tuple[RequestState, str, PagedKV]], list[Any]]:
        """The (state, variant) pairs whose output is not current, once each, with their caches
        set to read the state's tokens (what they hold of them stays; the rest, at least the
        last token for its logits, is read; their block tables fit), and their schedule."""
        from models.engine.scheduler import ScheduledSequence

        unknown = {variant for _, variant in items}.difference(self.variants)
        if unknown:
            self.check_variant(unknown.pop())
        self._reads += 1
        rows, scheduled = [], []
        last, tokens = None, []
        for state, variant in items:
            kv = state.kv.get(variant)
            if kv is None:
                kv = state.kv[variant] = PagedKV()
            elif kv.read == self._reads or state.output(variant) is not None:
                continue  # listed twice, or current
            kv.read = self._reads
            if state is not last:  # a request's variants follow each other: one token list
                last, tokens = state, state.tokens
                if not tokens or len(tokens) > self.max_len:
                    raise ValueError(
                        f"request {state.request_id} has {len(tokens)} tokens; the small model "
                        f"reads 1 to {self.max_len} (steering.max_model_len)"
                    )
            # the state crops its caches whenever its tokens change (RequestState._keep_prefix),
            # so the first num_computed tokens of the cache are still the state's
            kv.num_computed = min(kv.num_computed, len(tokens) - 1)
            kv.token_ids = tokens  # read-only: the variants of one request share the list
            if not self.blocks.fit(kv, len(tokens)):
                raise RuntimeError(
                    f"the small model's KV cache is full ({self.blocks.num_usable} blocks); "
                    "raise steering.kv_cache_gib"
                )
            rows.append((state, variant, kv))
            scheduled.append(ScheduledSequence(kv, len(tokens) - kv.num_computed))
        return rows, scheduled

    def _lora_weights(self, rows: list[tuple[RequestState, str, PagedKV]]) -> torch.Tensor | None:
        """Per-row LoRA slot weights [rows, slots] on the device; while the rows' variants
        stay the same (every decode step of the same requests) the same tensor, so neither a
        new copy nor the graph runner's copy into its buffer is made again."""
        from models.engine.device import to_device

        variants = tuple(v for _, v, _ in rows)
        if all(v == BASE for v in variants):
            return None
        if variants != self._lora_rows[0]:
            weights = [[0.0] * self.lora.num_slots for _ in rows]  # built on the host, one copy
            for row, variant in enumerate(variants):
                if variant != BASE:
                    weights[row][self.lora.slots.index(variant)] = 1.0
            self._lora_rows = variants, to_device(weights, self.runner.dtype, self.device)
        return self._lora_rows[1]

    def _capture_hidden(self, layers: Sequence[int]) -> dict[str, Any]:
        """Hooks that keep the chosen blocks' outputs for every token of the step."""
        captured: dict[str, Any] = {"hidden": {}, "handles": []}

        def keep(layer: int):
            def hook(_module, _inputs, output):
                if isinstance(output, tuple):  # (block output before its residual add, residual)
                    block_out, residual = output
                    if block_out.dim() == residual.dim() + 1:  # split-K partial sums (CUDA)
                        block_out = block_out.sum(0)
                    captured["hidden"][layer] = block_out.float() + residual.float()
                else:
                    captured["hidden"][layer] = output.clone()

            return hook

        for layer in layers:
            block = self.runner.model.layers[layer]
            captured["handles"].append(block.register_forward_hook(keep(layer)))
        return captured


def _lora_rank(path: str) -> int:
    return int(json.loads((Path(path) / "adapter_config.json").read_text()).get("r", 8))


def _num_blocks(path: str, config: Any, gib: float) -> int:
    from models.engine.device import pick_device, pick_dtype
    from models.engine.llama import read_model_args

    args = read_model_args(path)
    dtype = pick_dtype(config, pick_device(config))
    elem = torch.empty((), dtype=dtype).element_size()
    block_bytes = 2 * args.num_layers * config.block_size * args.num_kv_heads * args.head_dim * elem
    return max(4, int(gib * (1 << 30) // block_bytes))


def _tokenizer(path: str) -> Any:
    if not any((Path(path) / n).exists() for n in ("tokenizer.json", "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)
