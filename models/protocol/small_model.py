"""What a steering (small) model offers the steering runtime and its policies.

Two implementations in models/steering/: the engine's paged runner (PagedSmallModel, Llama
family, CUDA graphs) and a plain transformers one (TransformersSmallModel, any causal LM).
Both read a request incrementally: only tokens their cache has not seen yet.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch


class ReadState(Protocol):
    """The per-request state a small model reads into (models.steering.state.RequestState):
    the request's tokens, its caches by variant, and the outputs of the last read."""

    request_id: str
    kv: dict[str, Any]
    outputs: dict[str, Any]

    @property
    def tokens(self) -> list[int]: ...

    def output(self, variant: str) -> Any | None: ...


class SmallModel(Protocol):
    """A causal LM with optional LoRA variants ("base" = without LoRA), read per request.

    max_len: the longest sequence it reads (None: no limit of its own).
    reads_in_background: whether `read(..., background=True)` returns before the GPU is done.
    """

    device: torch.device
    num_layers: int
    vocab_size: int
    variants: list[str]
    tokenizer: Any
    max_len: int | None
    reads_in_background: bool

    def check_variant(self, variant: str) -> None:
        """Raise ValueError when `variant` is not loaded."""

    def read(
        self,
        items: list[tuple[ReadState, str]],
        hidden_layers: Sequence[int] = (),
        background: bool = False,
    ) -> None:
        """Make `state.output(variant)` current for every (state, variant) pair."""

    def base_hidden_states(self, texts: list[str], pool: str = "last") -> torch.Tensor:
        """Each block's output per text without LoRA: float32 [texts, blocks, hidden]."""

    def free(self, state: ReadState) -> None:
        """Drop the request's caches."""
