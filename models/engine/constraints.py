"""Constrained output inside the step: per-row grammar matchers and their batched token mask.

The compiler (a models.protocol ConstraintCompiler) is named by import path in the engine config
(`structured_output`) and built on the first constrained request, so the engine never imports
models.structured. Each step the matchers of the sampling rows fill one CPU bitmask (llguidance
does it on its own threads) while the step's forward runs on the device (`prepare`, called
right after the launch), one copy takes it to the device, and one masked_fill applies it to
the logits after steering adjustments, before sampling: outside the decode CUDA graph, which
stays the same. A row the grammar has completed finishes at once ("stop"); its end-of-sequence
token is the only one the mask would allow.

A row within CLOSE_WITHIN tokens of its max_tokens (or in the second half of a shorter budget) closes its output: among the tokens its grammar
allows it keeps the first non-empty tier of closing tokens: those made of `"}]` that start with a
quote (they end a string), then those made of `}]`, then `0` (the shortest number).
A model that would write on (a toy model fills strings with stories) then still ends with text
that parses, instead of JSON cut off at the limit; the text stays inside the grammar either way.
"""

from __future__ import annotations

from typing import Any

import torch

from models.engine.device import to_device
from models.engine.output import finish
from models.engine.sequence import Sequence
from models.plugins import import_subclass
from models.protocol.constraints import ConstraintCompiler
from models.protocol.errors import EngineError
from models.protocol.requests import GenerationRequest

_SHIFTS: dict[torch.device, torch.Tensor] = {}
CLOSE_WITHIN = 32
CLOSING_TIERS = (lambda t: t[0] == '"' and set(t) <= set('"}]'),
                 lambda t: set(t) <= set("}]"),
                 lambda t: t in ("0", "true", "false", "null"))  # fmt: skip


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """logits [rows, vocab] with -inf where bitmask [rows, words] (int32, on logits' device)
    has a 0 bit: bit j of word i is token 32*i + j. Out of place (logits may be a view of a
    CUDA graph's output)."""
    shifts = _SHIFTS.get(logits.device)
    if shifts is None:
        shifts = _SHIFTS[logits.device] = torch.arange(32, dtype=torch.int32, device=logits.device)
    allowed = ((bitmask[:, :, None] >> shifts) & 1).flatten(1)[:, : logits.shape[-1]]
    return logits.masked_fill(allowed == 0, float("-inf"))


class RowConstraints:
    """The engine's constrained rows: matchers per sequence, the step's mask, their advance."""

    def __init__(self, compiler_path: str | None, tokenizer: Any, vocab_size: int,
                 eos_token_ids: set[int], device: torch.device):  # fmt: skip
        self.compiler_path = compiler_path
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_token_ids = eos_token_ids
        self.device = device
        self._compiler: ConstraintCompiler | None = None
        self._bitmask = torch.empty(0, (vocab_size + 31) // 32, dtype=torch.int32)
        self._ahead = torch.empty(0, (vocab_size + 31) // 32, dtype=torch.int32)
        # rows filled by `prepare`: id(seq) -> (row of _ahead, the row's grammar moves then)
        self._prepared: dict[int, tuple[int, int]] = {}
        # the forward runs asynchronously on an accelerator: masks are filled meanwhile (a CPU
        # forward has finished before `prepare` is called; tests turn it on there)
        self.fill_during_forward = device.type != "cpu"
        self._closers: list[torch.Tensor] | None = None  # a bitmask [words] per closing tier
        self.mask_rows = 0  # rows masked so far (for stats and benches)

    @property
    def can_constrain(self) -> bool:
        """A compiler is configured and there is a tokenizer for it."""
        return bool(self.compiler_path) and self.tokenizer is not None

    def compiler(self) -> ConstraintCompiler:
        if self._compiler is None:
            if not self.can_constrain:
                why = "no tokenizer" if self.tokenizer is None else "structured_output is off"
                raise EngineError(f"this engine cannot constrain output ({why})",
                                  param="response_format")  # fmt: skip
            cls = import_subclass(self.compiler_path, ConstraintCompiler, "structured_output")
            self._compiler = cls(self.tokenizer, self.vocab_size, self.eos_token_ids)
        return self._compiler

    def applies(self, request: GenerationRequest) -> bool:
        """The request's output is constrained here: it has a constraint, and this engine can
        constrain output or the constraint is not optional (then compiling it fails)."""
        constraint = request.constraint
        return constraint is not None and (not constraint.optional or self.can_constrain)

    def check(self, request: GenerationRequest) -> None:
        if self.applies(request):
            self.compiler().check(request.constraint)

    def start(self, seq: Sequence) -> None:
        if self.applies(seq.request):
            seq.matcher = self.compiler().matcher(seq.request.constraint)

    def prepare(self, seqs: list[Sequence]) -> None:
        """Fill the masks of the step's constrained rows now, while the step's forward runs
        on the device (a row's mask depends only on the tokens it already has): on a GPU the
        host work overlaps the forward instead of following it. `apply` takes a prepared row
        unless its grammar moved since (a backtrack, forced tokens)."""
        rows = [s for s in seqs if s.matcher is not None]
        self._prepared = {}
        if not rows or not self.fill_during_forward:
            return
        if self._ahead.shape[0] < len(rows):
            self._ahead = torch.empty(len(rows), self._ahead.shape[1], dtype=torch.int32)
        ahead = self._ahead[: len(rows)]
        ahead.fill_(-1)
        self.compiler().fill_bitmask([(s.matcher, i) for i, s in enumerate(rows)], ahead)
        self._prepared = {id(s): (i, s.grammar_moves) for i, s in enumerate(rows)}

    def apply(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """The step's logits [rows, vocab] with each constrained row's disallowed tokens -inf."""
        rows = [(s.matcher, i) for i, s in enumerate(seqs) if s.matcher is not None]
        if not rows:
            return logits
        if self._bitmask.shape[0] < len(seqs):
            self._bitmask = torch.empty(len(seqs), self._bitmask.shape[1], dtype=torch.int32)
        bitmask = self._bitmask[: len(seqs)]
        bitmask.fill_(-1)
        stale, dst, src = [], [], []
        for matcher, i in rows:
            ready = self._prepared.get(id(seqs[i]))
            if ready is not None and ready[1] == seqs[i].grammar_moves:
                dst.append(i)
                src.append(ready[0])
            else:
                stale.append((matcher, i))
        if dst:  # one gather for the prepared rows
            bitmask[torch.tensor(dst)] = self._ahead[torch.tensor(src)]
        if stale:
            self.compiler().fill_bitmask(stale, bitmask)
        self._prepared = {}
        self.mask_rows += len(rows)
        for _, i in rows:
            request = seqs[i].request
            if request.constraint.optional:  # free text around optional calls: never closed
                continue
            params = request.params
            window = min(CLOSE_WITHIN, params.max_tokens // 2)
            if params.max_tokens - seqs[i].num_generated <= window:
                for tier in self.closers():
                    closing = bitmask[i] & tier
                    if bool(closing.any()):
                        bitmask[i] = closing
                        break
        return apply_bitmask(logits, to_device(bitmask, torch.int32, logits.device))

    def closers(self) -> list[torch.Tensor]:
        """A bitmask [words] of the closing tokens of each tier in CLOSING_TIERS."""
        if self._closers is None:
            texts = self.tokenizer.batch_decode([[i] for i in range(len(self.tokenizer))])
            self._closers = []
            for tier in CLOSING_TIERS:
                bits = torch.zeros(self._bitmask.shape[1] * 32, dtype=torch.int64)
                for i, text in enumerate(texts[: self.vocab_size]):
                    bits[i] = bool(text) and tier(text)
                words = (bits.view(-1, 32) << torch.arange(32)).sum(-1).bitwise_and(0xFFFFFFFF)
                self._closers.append(words.to(torch.int32))
        return self._closers

    def advance(self, seq: Sequence, token_ids: list[int]) -> None:
        """The grammar takes the row's new tokens: an error finishes it with "error", a
        completed grammar with "stop" (when nothing else finished it already)."""
        matcher = seq.matcher
        if matcher is None or not token_ids:
            return
        seq.grammar_moves += 1
        if not matcher.consume(token_ids):
            if not seq.is_finished or seq.finish_reason != "stop":
                finish(seq, "error", f"the output left its grammar: {matcher.error}")
        elif matcher.is_complete() and not seq.is_finished:
            finish(seq, "stop")

    def rollback(self, seq: Sequence, num_tokens: int) -> None:
        if seq.matcher is not None:
            seq.grammar_moves += 1
            seq.matcher.rollback(num_tokens)
