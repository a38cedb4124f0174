"""LoRA adapters resident in the engine's stacked slots (see models.engine.lora).

Adapters are PEFT directories (adapter_config.json + adapter_model.safetensors). A name
stays registered with its path after it is evicted (least recently used, never one a live
request uses), and is read back into a slot when a request names it again.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from models.engine.config import EngineConfig
from models.engine.llama import LlamaForCausalLM
from models.engine.lora import LinearWithLoRA
from models.engine.sequence import Sequence
from models.protocol.errors import AdapterNotFoundError, EngineError, EngineOverloadedError
from models.protocol.requests import GenerationRequest

SUPPORTED_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

LoRAWeights = dict[str, tuple[torch.Tensor, torch.Tensor, float]]  # module -> (A, B, scale)


class LoRAAdapters:
    """Which adapter sits in which slot, loading, LRU eviction, and per-row slot weights."""

    def __init__(self, model: LlamaForCausalLM, config: EngineConfig):
        self.model = model
        self.num_slots = config.max_adapters_per_replica
        self.max_rank = config.max_lora_rank
        self.linears = model.lora_linears()
        self.paths: dict[str, str] = {}  # every registered adapter, resident or evicted
        self.loads: dict[str, int] = {}  # times each name was loaded (its weights may differ)
        self.slots: list[str | None] = [None] * self.num_slots
        self.pins = [0] * self.num_slots
        self.last_used = [0] * self.num_slots
        self.clock = 0
        self.frozen = False
        if self.num_slots:
            for layer in lora_linear_layers(model):
                layer.allocate_lora(self.num_slots, self.max_rank)

    def drop_unused_linears(self) -> int:
        """For a fixed set of adapters, all loaded already (the steering small model's): free
        the LoRA room of every projection none of them writes, so its forward skips the LoRA
        kernel. Nothing can be loaded afterwards. Returns how many layers were freed."""
        freed = 0
        for layer in lora_linear_layers(self.model):
            if layer.lora_b is not None and not bool(layer.lora_b.any()):
                layer.free_lora()
                freed += 1
        self.frozen = True
        return freed

    def names(self) -> list[str]:
        return sorted(self.paths)

    def resident(self) -> list[str]:
        return [n for n in self.slots if n is not None]

    def load(self, name: str, path: str) -> None:
        """Read and validate `path`, then put it in a slot (replacing an older `name`)."""
        if self.num_slots == 0:
            raise EngineError("this engine has max_adapters_per_replica = 0: LoRA is off")
        if self.frozen:
            raise EngineError("this model's adapter set is fixed; no adapter can be loaded")
        weights = self.read(path)
        slot = self.slots.index(name) if name in self.slots else self._free_slot()
        self._write(slot, name, weights)
        self.paths[name] = path
        self.loads[name] = self.loads.get(name, 0) + 1

    def unload(self, name: str) -> None:
        if name not in self.paths:
            raise self._not_found(name)
        if name in self.slots:
            slot = self.slots.index(name)
            if self.pins[slot]:
                raise EngineError(f"adapter '{name}' is in use by {self.pins[slot]} requests")
            self._clear(slot)
        del self.paths[name]

    def check(self, request: GenerationRequest) -> None:
        names = self._requested(request)
        for name in names:
            if name not in self.paths:
                raise self._not_found(name)
        if len(names) > self.num_slots:
            raise EngineError(
                f"the request mixes {len(names)} adapters; this engine holds at most "
                f"{self.num_slots} at once"
            )

    def acquire(self, request: GenerationRequest) -> dict[int, float]:
        """Make the request's adapters resident and pin them: slot -> weight."""
        out: dict[int, float] = {}
        try:
            for name, weight in self._requested(request).items():
                if name not in self.slots:
                    self._write(self._free_slot(), name, self.read(self.paths[name]))
                slot = self.slots.index(name)
                self.pins[slot] += 1
                self.clock += 1
                self.last_used[slot] = self.clock
                out[slot] = weight
        except EngineError:
            for slot in out:  # unpin what this request took before failing
                self.pins[slot] -= 1
            raise
        return out

    def release(self, seq: Sequence) -> None:
        for slot in seq.adapter_weights:
            self.pins[slot] -= 1
        seq.adapter_weights = {}

    def identity(self, seq: Sequence) -> list[tuple[str, int, float]]:
        """(name, load count, weight) of the adapters seq uses: its blocks' K/V depend on them."""
        return [
            (name, self.loads.get(name, 0), weight)
            for name, weight in self._requested(seq.request).items()
        ]

    def weights(self, seqs: list[Sequence]) -> torch.Tensor | None:
        """Per-row slot weights [rows, slots], or None when no row uses an adapter."""
        if not any(s.adapter_weights for s in seqs):
            return None
        out = [[0.0] * self.num_slots for _ in seqs]  # built on the host, one copy
        for row, seq in enumerate(seqs):
            for slot, weight in seq.adapter_weights.items():
                out[row][slot] = weight
        return torch.tensor(out)

    def _requested(self, request: GenerationRequest) -> dict[str, float]:
        if request.adapter_weights:
            return dict(request.adapter_weights)
        return {request.adapter: 1.0} if request.adapter else {}

    def _not_found(self, name: str) -> AdapterNotFoundError:
        return AdapterNotFoundError.naming(name, self.names(), param="adapter")

    def _free_slot(self) -> int:
        if None in self.slots:
            return self.slots.index(None)
        unpinned = [s for s in range(self.num_slots) if self.pins[s] == 0]
        if not unpinned:
            raise EngineOverloadedError(
                f"all {self.num_slots} adapter slots are used by running requests; retry later"
            )
        slot = min(unpinned, key=lambda s: self.last_used[s])
        self._clear(slot)
        return slot

    def _clear(self, slot: int) -> None:
        for layer in lora_linear_layers(self.model):
            layer.clear_slot(slot)
        self.slots[slot] = None

    def _write(self, slot: int, name: str, weights: LoRAWeights) -> None:
        self._clear(slot)
        for module, (a, b, scale) in weights.items():
            layer, part = self.linears[module]
            layer.set_slot(slot, part, a, b, scale)
        self.slots[slot] = name
        self.clock += 1
        self.last_used[slot] = self.clock

    def read(self, path: str) -> LoRAWeights:
        """Parse and validate a PEFT LoRA directory against this model; EngineError if unfit."""
        directory = Path(path)
        config_file = directory / "adapter_config.json"
        weights_file = directory / "adapter_model.safetensors"
        if not config_file.exists() or not weights_file.exists():
            raise EngineError(
                f"{path} is not a PEFT LoRA directory (needs adapter_config.json and "
                "adapter_model.safetensors)"
            )
        try:
            cfg = json.loads(config_file.read_text())
            tensors = load_file(str(weights_file))
        except Exception as exc:
            raise EngineError(f"cannot read the LoRA adapter in {path}: {exc}") from None
        if cfg.get("peft_type", "LORA") != "LORA" or cfg.get("use_dora"):
            raise EngineError(f"{path}: only plain LoRA adapters are supported (no DoRA)")
        targets = cfg.get("target_modules") or []
        targets = [targets] if isinstance(targets, str) else targets
        unsupported = [t for t in targets if t not in SUPPORTED_TARGETS and not _is_regex(t)]
        if unsupported:
            raise EngineError(
                f"{path}: target modules {unsupported} are not supported "
                f"(supported: {', '.join(SUPPORTED_TARGETS)})"
            )
        return self._match(path, cfg, tensors)

    def _match(self, path: str, cfg: dict, tensors: dict[str, torch.Tensor]) -> LoRAWeights:
        out: LoRAWeights = {}
        for key, a in tensors.items():
            if ".lora_A." not in key:
                continue
            module = key.split(".lora_A.")[0]
            module = module[module.index("layers.") :] if "layers." in module else module
            b = tensors.get(key.replace(".lora_A.", ".lora_B."))
            if module not in self.linears or b is None:
                raise EngineError(f"{path}: LoRA weight '{key}' does not fit this base model")
            layer, part = self.linears[module]
            rank = a.shape[0]
            if rank > self.max_rank:
                raise EngineError(
                    f"{path}: rank {rank} exceeds this engine's max_lora_rank {self.max_rank}"
                )
            want_a, want_b = (rank, layer.in_features), (layer.part_sizes[part], rank)
            if tuple(a.shape) != want_a or tuple(b.shape) != want_b:
                raise EngineError(
                    f"{path}: '{module}' LoRA shapes {tuple(a.shape)}/{tuple(b.shape)} do not "
                    f"fit the base model ({want_a}/{want_b}): adapter of another base?"
                )
            alpha = cfg.get("alpha_pattern", {}).get(
                module.split(".")[-1], cfg.get("lora_alpha", 8)
            )
            if not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
                raise EngineError(f"{path}: lora_alpha of '{module}' is {alpha!r}, not a number")
            scale = alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank
            _check_finite(path, module, a, b * scale, layer.lora_b)
            out[module] = (a, b, scale)
        if not out:
            raise EngineError(f"{path}: no LoRA weights found")
        return out


def _check_finite(path: str, module: str, a: torch.Tensor, b: torch.Tensor, slot: Any) -> None:
    """EngineError unless both LoRA factors stay finite in the slots' dtype (one NaN there
    would turn every row of every adapter that shares the batch into NaN)."""
    dtype = slot.dtype if slot is not None else a.dtype
    if not all(bool(torch.isfinite(t.to(dtype)).all()) for t in (a, b)):
        raise EngineError(
            f"{path}: the LoRA weights of '{module}' hold NaN or infinite values (or values "
            f"past {dtype}'s range); refusing the adapter"
        )


def _is_regex(target: str) -> bool:
    return bool(re.search(r"[\\.*+?\[\]()|^$]", target))


def lora_linear_layers(model: LlamaForCausalLM) -> list[LinearWithLoRA]:
    return list({id(lin): lin for lin, _ in model.lora_linears().values()}.values())
