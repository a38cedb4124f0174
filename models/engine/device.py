"""Where the engine's tensors live and how host data gets there: the configured device and
dtype, host->device copies that never wait for queued GPU work (through reused pinned
buffers), and a copy-free stack of rows that are views of one tensor.
"""

from __future__ import annotations

import math
import threading
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from models.engine.config import EngineConfig


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
    """The configured dtype; "auto": bfloat16 on CUDA, float32 elsewhere."""
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
