"""The small model in the loop: one transformers checkpoint, its LoRA variants, batched reads.

`TransformersSmallModel.read(items)` brings every (request, variant) pair up to date with its
request's tokens in one batched forward: each request keeps its own KV cache (`KVState`), the caches are
left-padded into one batch cache, the unread tokens right-padded after them, and the new keys
and values are split back per request. Variants are `base` (no LoRA) or a PEFT adapter name;
one forward mixes them per row (PEFT `adapter_names`). A paged runner can replace this class
behind the same `read` call.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from models.engine.device import to_device
from models.steering.state import BASE, KVState, RequestState, SmallOutput

LONG_READ = 32  # rows with more unread tokens than this get their own forward (no big padding)


class TransformersSmallModel:
    """A causal LM (the steering model) with optional LoRA adapters, read incrementally.

    path: checkpoint directory. adapters: variant name -> PEFT adapter directory.
    device: "cpu", "cuda" or "auto"; dtype: torch dtype name or "auto" (float32 on CPU,
    bfloat16 on CUDA).
    """

    def __init__(
        self,
        path: str,
        adapters: dict[str, str] | None = None,
        device: str = "auto",
        dtype: str = "auto",
    ):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if dtype == "auto":
            dtype = "bfloat16" if device == "cuda" else "float32"
        self.path = path
        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
        self.config = model.config
        self.num_layers = model.config.num_hidden_layers
        self.vocab_size = model.config.vocab_size
        self.variants = [BASE, *(adapters or {})]
        if adapters:
            model = _with_adapters(model, adapters)
        self.model = model.to(self.device).eval()
        self._has_adapters = bool(adapters)
        base_forward = self.model.get_base_model().forward if adapters else self.model.forward
        # transformers >= 5.2x renamed past_key_values to cache
        params = inspect.signature(base_forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"

    def check_variant(self, variant: str) -> None:
        if variant not in self.variants:
            raise ValueError(
                f"small-model variant '{variant}' is not loaded; loaded: {', '.join(self.variants)}"
            )

    def base_hidden_states(self, texts: list[str], pool: str = "last") -> torch.Tensor:
        """Each block's output at the last token of each text ("last") or averaged over its
        tokens ("mean"), without LoRA: float32 [num_texts, num_blocks, hidden]."""
        from models.steering.vectors import transformers_hidden_states

        read = transformers_hidden_states(self.model, self.tokenizer, pool=pool)
        # PEFT keeps LoRA layers in place: turn them off to read the base model
        if not self._has_adapters:
            return read(texts)
        with self.model.disable_adapter():
            return read(texts)

    def free(self, state: RequestState) -> None:
        """Drop the request's caches (plain tensors: freed when unreferenced)."""
        state.kv.clear()

    reads_in_background = False  # every read runs at once
    max_len: int | None = None  # reads whatever length the checkpoint takes

    @torch.no_grad()
    def read(
        self,
        items: list[tuple[RequestState, str]],
        hidden_layers: Sequence[int] = (),
        background: bool = False,
    ) -> None:
        """Make `state.output(variant)` current for every pair, reading only unread tokens;
        `hidden_layers` also keeps those blocks' outputs for the tokens read. `background` is
        accepted for the runner interface; this runner always reads at once."""
        todo = []
        for state, variant in items:
            self.check_variant(variant)
            if not state.tokens:
                raise ValueError(f"request {state.request_id} has no tokens to read")
            if state.output(variant) is not None or any(
                s is state and v == variant for s, v in todo
            ):
                continue
            kv = state.kv.setdefault(variant, KVState())
            kv.crop(len(state.tokens) - 1)  # always re-read at least the last token for its logits
            todo.append((state, variant))
        short = [item for item in todo if _unread(item) <= LONG_READ]
        if short:
            self._forward(short, hidden_layers)
        for item in todo:
            if _unread(item) > LONG_READ:
                self._forward([item], hidden_layers)

    def _forward(self, items: list[tuple[RequestState, str]], hidden_layers: Sequence[int]):
        from transformers import DynamicCache

        kvs = [state.kv[variant] for state, variant in items]
        new = [state.tokens[kv.length :] for (state, _), kv in zip(items, kvs, strict=True)]
        past = max(kv.length for kv in kvs)
        width = max(len(ids) for ids in new)
        rows = len(items)
        input_ids = torch.zeros(rows, width, dtype=torch.long)
        mask = torch.zeros(rows, past + width, dtype=torch.long)
        positions = torch.zeros(rows, width, dtype=torch.long)
        for i, (kv, ids) in enumerate(zip(kvs, new, strict=True)):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            mask[i, past - kv.length : past + len(ids)] = 1
            positions[i] = kv.length + torch.arange(width)
        cache = DynamicCache()
        if past:
            template = next(kv for kv in kvs if kv.length)
            for layer in range(self.num_layers):
                like = template.layers[layer][0]
                keys = torch.stack([_left_pad(kv.layers, layer, 0, past, like) for kv in kvs])
                values = torch.stack([_left_pad(kv.layers, layer, 1, past, like) for kv in kvs])
                cache.update(keys, values, layer)
        kwargs: dict[str, Any] = {self._cache_kwarg: cache}
        if self._has_adapters:
            kwargs["adapter_names"] = [v if v != BASE else "__base__" for _, v in items]
        out = self.model(
            input_ids=input_ids.to(self.device),
            attention_mask=mask.to(self.device),
            position_ids=positions.to(self.device),
            use_cache=True,
            output_hidden_states=bool(hidden_layers),
            **kwargs,
        )
        last = to_device([len(ids) - 1 for ids in new], torch.int64, out.logits.device)
        logits = out.logits[torch.arange(rows, device=last.device), last].float()  # [rows, vocab]
        for i, ((state, variant), kv, ids) in enumerate(zip(items, kvs, new, strict=True)):
            kv.layers = [
                _append(kv, layer, cache.layers[layer].keys[i], cache.layers[layer].values[i],
                        past, len(ids))
                for layer in range(self.num_layers)
            ]  # fmt: skip
            kv.length += len(ids)
            state.outputs[variant] = SmallOutput(
                batch=logits,
                row=i,
                length=kv.length,
                hidden={
                    layer: out.hidden_states[layer + 1][i, : len(ids)].float()
                    for layer in hidden_layers
                },
            )


def _unread(item: tuple[RequestState, str]) -> int:
    state, variant = item
    return len(state.tokens) - state.kv[variant].length


def _left_pad(layers: list, layer: int, which: int, length: int, like: torch.Tensor):
    """One request's keys (which=0) or values (1) of `layer`, zero-padded on the left to
    `length` positions (the mask hides the padding)."""
    if not layers:
        return like.new_zeros(like.shape[0], length, like.shape[2])
    t = layers[layer][which]
    return F.pad(t, (0, 0, length - t.shape[1], 0))


def _append(kv: KVState, layer: int, keys: torch.Tensor, values: torch.Tensor, past: int, n: int):
    new_k, new_v = keys[:, past : past + n], values[:, past : past + n]
    if not kv.layers or kv.length == 0:
        return new_k.clone(), new_v.clone()
    old_k, old_v = kv.layers[layer]
    return torch.cat([old_k, new_k], dim=1), torch.cat([old_v, new_v], dim=1)


def _with_adapters(model: Any, adapters: dict[str, str]) -> Any:
    from peft import PeftModel

    items = list(adapters.items())
    name, path = items[0]
    _check_adapter(path)
    model = PeftModel.from_pretrained(model, path, adapter_name=name)
    for name, path in items[1:]:
        _check_adapter(path)
        model.load_adapter(path, adapter_name=name)
    return model


def _check_adapter(path: str) -> None:
    if not (Path(path) / "adapter_config.json").is_file():
        raise FileNotFoundError(f"small-model adapter {path} has no adapter_config.json")
