"""Constrained output: what a request's text must match, and the per-row token mask contract.

A request carries an `OutputConstraint` (plain data, pickles across Ray). An engine that
honours it asks a `ConstraintCompiler` (models.structured implements one over llguidance) for
one `TokenMatcher` per row; each step the matchers of the rows about to sample write their
allowed tokens into a bitmask (int32 words, bit j of word i = token 32*i + j allowed), which the
engine applies to the logits on the device after steering adjustments and before sampling.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Literal

import torch

ConstraintKind = Literal["json_object", "json_schema", "lark", "regex"]


@dataclass(frozen=True)
class OutputConstraint:
    """The generated text must match this. `spec` is the JSON schema as JSON text (json_schema),
    a Lark grammar (lark), a regex (regex), or "" (json_object: any JSON object).

    `optional`: a guard on free text rather than a format (the tool calls of `tool_choice:
    auto`, which the model may or may not write): an engine that cannot constrain output serves
    the request without it, and free text is never steered to a close near max_tokens."""

    kind: ConstraintKind
    spec: str = ""
    optional: bool = False


class TokenMatcher(ABC):
    """One row's grammar state: which tokens may come next, advanced token by token."""

    @abstractmethod
    def consume(self, token_ids: list[int]) -> bool:
        """Advance over tokens; False (and `error` set) when one is not allowed."""

    @abstractmethod
    def rollback(self, num_tokens: int) -> None:
        """Forget the last `num_tokens` consumed tokens (a steering backtrack)."""

    @abstractmethod
    def is_complete(self) -> bool:
        """The text matches the whole grammar and nothing may follow it but end of sequence."""

    @property
    @abstractmethod
    def error(self) -> str | None:
        """Why the matcher stopped accepting tokens, or None."""


class ConstraintCompiler(ABC):
    """Turns OutputConstraints into matchers for one tokenizer and vocabulary."""

    @abstractmethod
    def check(self, constraint: OutputConstraint) -> None:
        """Raise EngineError(param="response_format") when the constraint cannot be compiled."""

    @abstractmethod
    def matcher(self, constraint: OutputConstraint) -> TokenMatcher:
        """A fresh matcher at the start of the output."""

    @abstractmethod
    def fill_bitmask(self, rows: list[tuple[TokenMatcher, int]], bitmask: torch.Tensor) -> None:
        """Write each (matcher, row) pair's allowed tokens into row `row` of the CPU int32
        bitmask [rows, ceil(vocab / 32)]; other rows are left as they are."""
