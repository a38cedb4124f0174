"""The ConstraintCompiler over llguidance (Microsoft's Rust grammar engine behind guidance).

Chosen over xgrammar and outlines-core (bench/grammar.py, figures in README.md): no CUDA or
triton dependency on a CPU install (xgrammar pulls triton), JSON schema, Lark grammars that
embed JSON schemas (the tool-call grammar) and regex in one matcher, a threaded batch fill, and
rollback for steering backtracks. xgrammar fills a mask faster per token (its compile step
precomputes more); outlines-core compiles a large vocabulary too slowly (seconds). Another
compiler plugs in through `engine.structured_output`. JSON comes out compact (no free
whitespace between tokens), so a model cannot pad an object with blanks until max_tokens.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from typing import Any

import llguidance
import llguidance.hf
import llguidance.torch
import torch

from models.protocol.constraints import ConstraintCompiler, OutputConstraint, TokenMatcher
from models.protocol.errors import EngineError

JSON_OPTIONS = {"whitespace_flexible": False}
MAX_CACHED_GRAMMARS = 256


class LLGuidanceMatcher(TokenMatcher):
    """One row's llguidance matcher."""

    def __init__(self, matcher: llguidance.LLMatcher):
        self.inner = matcher

    def consume(self, token_ids: list[int]) -> bool:
        return self.inner.consume_tokens(token_ids) and not self.inner.is_error()

    def rollback(self, num_tokens: int) -> None:
        if num_tokens:
            self.inner.rollback(num_tokens)

    def is_complete(self) -> bool:
        return self.inner.is_stopped() and not self.inner.is_error()

    @property
    def error(self) -> str | None:
        return self.inner.get_error() if self.inner.is_error() else None


def grammar_of(constraint: OutputConstraint) -> str:
    """The llguidance grammar text of a constraint (ValueError for an unreadable spec)."""
    if constraint.kind == "json_object":
        return llguidance.LLMatcher.grammar_from_json_schema(
            {"type": "object"}, defaults=JSON_OPTIONS)  # fmt: skip
    if constraint.kind == "json_schema":
        schema = json.loads(constraint.spec)
        if not isinstance(schema, dict):
            raise ValueError("the JSON schema must be an object")
        return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
    if constraint.kind == "lark":
        return llguidance.LLMatcher.grammar_from_lark(constraint.spec)
    if constraint.kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(constraint.spec)
    raise ValueError(f"unknown constraint kind {constraint.kind!r}")


class LLGuidanceCompiler(ConstraintCompiler):
    """Compiles constraints for one HF fast tokenizer; grammars are cached by constraint."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: set[int],
                 num_threads: int | None = None):  # fmt: skip
        eos = sorted(eos_token_ids) or None
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=eos)
        self.vocab_size = vocab_size
        # Its worker threads spin for a while after a batch; on a small CPU they steal the
        # cores the model's forward runs on, so there the rows are filled one by one.
        threads = num_threads or min(8, (os.cpu_count() or 1) // 2)
        self.executor = llguidance.LLExecutor(threads) if threads > 1 else None
        self._grammars: OrderedDict[OutputConstraint, str] = OrderedDict()

    def _grammar(self, constraint: OutputConstraint) -> str:
        grammar = self._grammars.get(constraint)
        if grammar is not None:
            self._grammars.move_to_end(constraint)
            return grammar
        try:
            grammar = grammar_of(constraint)
        except ValueError as exc:
            raise EngineError(f"response_format: {exc}", param="response_format") from None
        error = llguidance.LLMatcher.validate_grammar(grammar, self.tokenizer)
        if error:
            raise EngineError(f"response_format: the grammar does not compile: {error}",
                              param="response_format")  # fmt: skip
        self._grammars[constraint] = grammar
        if len(self._grammars) > MAX_CACHED_GRAMMARS:
            self._grammars.popitem(last=False)
        return grammar

    def check(self, constraint: OutputConstraint) -> None:
        self._grammar(constraint)

    def matcher(self, constraint: OutputConstraint) -> LLGuidanceMatcher:
        inner = llguidance.LLMatcher(self.tokenizer, self._grammar(constraint), log_level=0)
        if inner.is_error():
            raise EngineError(f"response_format: {inner.get_error()}", param="response_format")
        return LLGuidanceMatcher(inner)

    def fill_bitmask(self, rows: list[tuple[TokenMatcher, int]], bitmask: torch.Tensor) -> None:
        pairs = [(m.inner, row) for m, row in rows if isinstance(m, LLGuidanceMatcher)]
        if self.executor is None or len(pairs) == 1:
            for matcher, row in pairs:
                llguidance.torch.fill_next_token_bitmask(matcher, bitmask, row)
        elif pairs:
            llguidance.torch.fill_next_token_bitmask_par(self.executor, pairs, bitmask)
