"""Per-request state the Steerer keeps between engine steps."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

BASE = "base"  # the small-model variant without any LoRA


def variant_name(adapter: str) -> str:
    """The variant an adapter is known by: its name, or the directory name of a path."""
    return Path(adapter).name if "/" in adapter else adapter


@dataclass(eq=False)
class KVState:
    """One request's KV cache in one small-model variant: per layer (keys, values), each
    [kv_heads, length, head_dim]. A paged runner would hold block ids here instead."""

    layers: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    length: int = 0

    def crop(self, length: int) -> None:
        length = max(length, 0)
        if length >= self.length:
            return
        self.layers = [(k[:, :length], v[:, :length]) for k, v in self.layers] if length else []
        self.length = length


@dataclass
class SmallOutput:
    """The small model's view after reading the sequence up to `length` tokens.

    batch: the next-token logits of every row of the read that made this output [rows, vocab];
    this output's are row `row` (`logits`). hidden: block index -> that block's output
    [n, hidden] for the tokens at positions length - n .. length - 1 (the ones the producing
    forward read), for the blocks that were asked for.
    """

    batch: torch.Tensor
    row: int
    length: int  # tokens read; the output is current while the sequence has this many
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)

    @property
    def logits(self) -> torch.Tensor:
        """Next-token logits [vocab]."""
        return self.batch[self.row]


def stack_logits(outputs: list[SmallOutput]) -> torch.Tensor:
    """The outputs' logits as one tensor [len(outputs), vocab]. When they are evenly spaced
    rows of one read (the usual case: a step's rows were read together, a request's variants
    side by side) it is a strided view of that read's logits, not a copy; callers only read it."""
    first = outputs[0]
    rows = [out.row for out in outputs]
    gap = rows[1] - rows[0] if len(rows) > 1 else 1
    if (
        gap > 0
        and all(out.batch is first.batch for out in outputs)
        and rows == list(range(rows[0], rows[0] + gap * len(rows), gap))
    ):
        return first.batch[rows[0] :: gap][: len(rows)]
    return torch.stack([out.logits for out in outputs])


@dataclass
class RequestState:
    """What the Steerer knows of one request: its tokens, small-model caches and outputs,
    validated policy params, and `scratch` for the policy's own per-request memory."""

    request_id: str
    policy: str | None
    params: Any = None
    max_backtrack: int = 0  # generated tokens the engine still holds back (steering params)
    prompt_ids: list[int] = field(default_factory=list)
    generated: list[int] = field(default_factory=list)
    kv: dict[str, KVState] = field(default_factory=dict)
    outputs: dict[str, SmallOutput] = field(default_factory=dict)
    scratch: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.generated

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.generated)

    @property
    def next_step(self) -> int:
        """Index of the generated token the current small-model outputs predict."""
        return len(self.generated)

    def reset(self, prompt_ids: list[int], generated: list[int]) -> None:
        """The sequence is now prompt_ids + generated; caches keep the prefix that still holds."""
        if list(prompt_ids) == self.prompt_ids:  # the usual case: only generated tokens moved
            self._keep_prefix(len(self.prompt_ids) + common_prefix(self.generated, generated))
        else:
            self._keep_prefix(common_prefix(self.tokens, [*prompt_ids, *generated]))
            self.prompt_ids = list(prompt_ids)
        self.generated = list(generated)

    def sync(self, token_ids: list[int], num_prompt: int) -> None:
        """reset(token_ids[:num_prompt], token_ids[num_prompt:]), cheap in the usual case of a
        sequence that only grew since the state last saw it (one compare, one extend)."""
        known = num_prompt + len(self.generated)
        if (
            num_prompt == len(self.prompt_ids)
            and len(token_ids) >= known
            and token_ids[:known] == self.prompt_ids + self.generated
        ):
            self.generated.extend(token_ids[known:])  # the caches still hold what they held
        else:
            self.reset(token_ids[:num_prompt], token_ids[num_prompt:])

    def set_generated(self, step: int, token_ids: list[int]) -> None:
        """Generated tokens from index `step` on are now `token_ids` (later ones are gone: a
        backtrack, or a rewrite). Raises LookupError when tokens before `step` are unknown."""
        generated = self.generated
        if step > len(generated):
            raise LookupError(
                f"request {self.request_id}: tokens {len(generated)}..{step - 1} were never "
                "reported"
            )
        if step == len(generated):  # new tokens at the end (every step): caches stay valid
            generated.extend(token_ids)
            return
        if generated[step:] == list(token_ids):  # already known (a prefetch read them)
            return
        same = common_prefix(generated[step:], token_ids)
        self._keep_prefix(len(self.prompt_ids) + step + same)
        self.generated = self.generated[:step] + list(token_ids)

    def output(self, variant: str) -> SmallOutput | None:
        """The small model's output for `variant` if it has read exactly the current tokens."""
        out, kv, n = self.outputs.get(variant), self.kv.get(variant), self.num_tokens
        # a rewrite of the same length crops the cache, so both must still cover every token
        return out if out is not None and kv is not None and out.length == kv.length == n else None

    def _keep_prefix(self, length: int) -> None:
        for kv in self.kv.values():
            kv.crop(length)


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading token ids two sequences share."""
    shorter = min(len(a), len(b))
    if a[:shorter] == b[:shorter]:  # the usual case (a sequence grew), compared in C
        return shorter
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
