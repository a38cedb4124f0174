"""Which kernel serves a matmul shape: cuBLAS or a skinny-GEMM config, the fused LoRA or the
linear plus `lora_add_`. Each shape is timed once, at its first call outside graph capture,
unless the shipped table for this GPU model (models/engine/tuned/<name>.json) holds it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from models.engine.kernels.launch import OutOfResources, triton, use_triton
from models.engine.kernels.lora import RowLoRA
from models.engine.kernels.skinny_gemm import (
    fused_lora_configs,
    linear_configs,
    silu_and_mul,
    skinny_linear,
)
from models.engine.streams import private_stream

_linear_choice: dict[tuple, tuple | None] = {}
MAX_SKINNY_ROWS = 32  # more rows than this always use cuBLAS
MIN_TUNED_WEIGHT_BYTES = 4 << 20  # smaller weights always use cuBLAS
MAX_TUNING_COPIES = 64
FUSED_LORA = os.environ.get("TANDEM_FUSED_LORA", "1") != "0"  # 0: always linear + lora_add_


def unfused_lora_linear(x, weight, bias, lora: RowLoRA, partials: bool, gated: bool):
    """`lora_linear` without the fused kernel: the linear by its own tuned choice, then
    `lora_add_` (into the first split-K partial sum), then silu-and-mul when gated."""
    y = tuned_linear(x, weight, bias, partials)
    lora.add_(y[0] if y.dim() == 3 else y, x)  # partial sums: the LoRA joins the first
    return silu_and_mul(*y.chunk(2, dim=-1)) if gated else y


def tuned_linear(x, weight, bias, partials: bool, gated: bool = False) -> torch.Tensor:
    """x @ weight.T (+ bias) by the tuned choice for its shape: cuBLAS or a skinny config
    (partials: which may return split-K partial sums; gated: silu(gate) * up)."""
    config = tuned_config(x, weight, bias, partials, gated)
    if config is None:
        y = torch.nn.functional.linear(x, weight, bias)
        return silu_and_mul(*y.chunk(2, dim=-1)) if gated else y
    return skinny_linear(x, weight, bias, config, gated)


def tuned_config(x, weight, bias, partials: bool, gated: bool, lora: RowLoRA | None = None):
    """The skinny config chosen for this shape, or None for cuBLAS (timed at first use). With
    `lora`: the config of the fused kernel, or None for the linear plus `lora_add_`."""
    if not use_triton(x) or x.dim() != 2 or x.shape[0] > MAX_SKINNY_ROWS or x.stride(-1) != 1:
        return None
    if lora is not None and not FUSED_LORA:
        return None
    rows = triton.next_power_of_2(x.shape[0])
    lora_key = lora.key() if lora is not None else None
    key = (weight.shape[0], weight.shape[1], rows, x.dtype, partials, gated, lora_key)
    if key not in _linear_choice:
        if torch.cuda.is_current_stream_capturing():
            return None
        shipped = _shipped_choices(x.device)
        if _table_key(key) in shipped:  # chosen on this GPU model before: no timing
            value = shipped[_table_key(key)]
            _linear_choice[key] = tuple(value) if value is not None else None
            return _linear_choice[key]
        if lora is None:
            configs = linear_configs(partials, gated)
        else:
            configs = fused_lora_configs(weight, bias, lora, partials, gated)
            if configs:  # the unfused path it competes with picks its own config first
                tuned_config(x, weight, bias, partials, False)
        _linear_choice[key] = _pick_linear(x, weight, bias, configs, gated, lora, partials)
    return _linear_choice[key]


def _pick_linear(
    x,
    weight,
    bias,
    configs: list[tuple],
    gated: bool = False,
    lora: RowLoRA | None = None,
    partials: bool = False,
) -> tuple | None:
    """The fastest skinny config for this shape, or None when cuBLAS is faster (with `lora`:
    the fastest fused config, or None when the linear plus `lora_add_` is faster)."""
    if weight.stride(-1) != 1 or weight.shape[1] % 16 or not configs:
        return None
    nbytes = weight.numel() * weight.element_size()
    if nbytes < MIN_TUNED_WEIGHT_BYTES:  # launch-bound and L2-resident: nothing to win
        return None
    times = time_linear_configs(x.shape[0], weight, bias, configs, gated, lora, partials)
    best, best_ms = None, times.pop(None)
    for config, ms in times.items():
        if ms < best_ms * 0.97:
            best, best_ms = config, ms
    return best


_tuning_streams: dict[int, torch.cuda.Stream] = {}


def _tuning_stream(device: torch.device) -> torch.cuda.Stream:
    """The tuner's own capture stream: its short-lived graphs never share a cuBLAS workspace
    with an engine's graphs (see models.engine.streams)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _tuning_streams:
        _tuning_streams[index] = private_stream(device)
    return _tuning_streams[index]


def _lora_copies(lora: RowLoRA, rows: int, copies: int) -> list[RowLoRA]:
    """`copies` RowLoRAs for the tuner, each (but the first) with its own copy of A and B, and
    row weights that put every odd row of `rows` on one slot (base and adapter rows side by
    side)."""
    device = lora.lora_a.device
    mix = torch.zeros(rows, lora.num_slots, device=device, dtype=lora.row_weights.dtype)
    odd = torch.arange(1, rows, 2, device=device)
    mix[odd, (odd // 2) % lora.num_slots] = 1.0
    token_rows = torch.arange(rows, device=device)
    a, b = lora.lora_a, lora.lora_b
    return [RowLoRA(a, b, mix, token_rows, lora.part_sizes, lora.rank)] + [
        RowLoRA(a.clone(), b.clone(), mix, token_rows, lora.part_sizes, lora.rank)
        for _ in range(copies - 1)
    ]


def _graph_ms(fn, weights: list[torch.Tensor], loras: list[RowLoRA | None]) -> float:
    """Milliseconds per call of fn(weight, lora) over the weight copies, captured in one CUDA
    graph on the tuner's stream and replayed five times."""
    for w, rl in zip(weights, loras, strict=True):
        fn(w, rl)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=_tuning_stream(weights[0].device)):
        for w, rl in zip(weights, loras, strict=True):
            fn(w, rl)
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / (5 * len(weights))


def time_linear_configs(
    rows: int,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    configs: list[tuple],
    gated: bool = False,
    lora: RowLoRA | None = None,
    partials: bool = False,
) -> dict[tuple | None, float]:
    """Milliseconds per call of x[rows] @ weight.T for cuBLAS (key None) and each skinny
    config (gated: `silu_mul_linear`, against cuBLAS plus the silu-and-mul kernel). Timed in a
    CUDA graph over enough weight copies that they stream from HBM as in a real step, not
    from L2. With `lora` (only its tensors and shape count: every odd row takes one slot),
    `lora_linear`: key None is the unfused path (the linear's own tuned choice, `partials`
    telling which, plus `lora_add_`), the configs are timed as fused kernels."""
    nbytes = weight.numel() * weight.element_size()
    rows = triton.next_power_of_2(rows)
    probe = torch.randn(rows, weight.shape[1], device=weight.device, dtype=weight.dtype)
    # enough copies to stream from HBM as in a real step; capped, since each is a graph launch
    copies = min(MAX_TUNING_COPIES, max(2, -(-(192 << 20) // nbytes)))
    weights = [weight] + [weight.clone() for _ in range(copies - 1)]
    loras = _lora_copies(lora, rows, copies) if lora is not None else [None] * copies

    def baseline(w: torch.Tensor, rl: RowLoRA | None) -> torch.Tensor:
        if rl is not None:
            return unfused_lora_linear(probe, w, bias, rl, partials, gated)
        y = torch.nn.functional.linear(probe, w, bias)
        return silu_and_mul(*y.chunk(2, dim=-1)) if gated else y

    times: dict[tuple | None, float] = {None: _graph_ms(baseline, weights, loras)}
    for config in configs:
        try:
            times[config] = _graph_ms(
                lambda w, rl, c=config: skinny_linear(probe, w, bias, c, gated, rl), weights, loras
            )
        except OutOfResources:  # e.g. float32 tiles past shared memory: not a candidate here
            continue
    return times


# shipped tuner choices, <GPU name>.json: models/engine/tuned, beside this package
TUNED_DIR = Path(__file__).parent.parent / "tuned"


def _table_key(key: tuple) -> str:
    """A tuner key as the shipped tables spell it, e.g. "4096x2048 rows=16 bfloat16
    partials=0 gated=0" (+ " lora=2048+1024+1024/1x16": part sizes / slots x rank)."""
    out, inp, rows, dtype, partials, gated, lora_key = key
    text = f"{out}x{inp} rows={rows} {str(dtype).removeprefix('torch.')} "
    text += f"partials={int(partials)} gated={int(gated)}"
    if lora_key is not None:
        parts, slots, rank = lora_key
        text += f" lora={'+'.join(map(str, parts))}/{slots}x{rank}"
    return text


_shipped: dict[str, dict[str, list | None]] = {}


def _shipped_choices(device: torch.device) -> dict[str, list | None]:
    """The choices shipped for this GPU model (models/engine/tuned/<name>.json, written from
    `tuning_table()` by the GPU benchmarks), so a cold start compiles only the chosen kernels
    instead of timing every candidate. TANDEM_RETUNE=1 ignores them."""
    name = torch.cuda.get_device_name(device)
    if name not in _shipped:
        file = TUNED_DIR / f"{tuning_file_stem(name)}.json"
        retune = os.environ.get("TANDEM_RETUNE", "0") != "0"
        loaded = json.loads(file.read_text())["choices"] if file.exists() and not retune else {}
        _shipped[name] = loaded
    return _shipped[name]


def tuning_file_stem(device_name: str) -> str:
    """"NVIDIA H200" -> "NVIDIA_H200"."""
    return "".join(c if c.isalnum() else "_" for c in device_name)


def tuning_table() -> dict[str, list | None]:
    """Every choice the tuner made in this process, keyed as the shipped tables are."""
    return {
        _table_key(key): list(value) if value is not None else None
        for key, value in sorted(_linear_choice.items(), key=lambda kv: str(kv[0]))
    }
