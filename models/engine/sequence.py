"""One request's state inside the engine: its tokens, cache blocks, sampler and output cursor."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch

from models.engine.hidden_capture import row_layers, row_prompt_positions
from models.protocol.outputs import Intervention, SpeculationStats, TokenLogprob
from models.protocol.requests import GenerationRequest


class SequenceStatus(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """Prompt + generated tokens of one request.

    `num_computed` tokens have their K/V in the cache; the rest (the last sampled token, forced
    tokens, or a prompt not yet prefilled) are run by the next step that schedules this
    sequence, and its last position's logits pick the next token.
    """

    request: GenerationRequest
    generator: torch.Generator
    arrival: int
    token_ids: list[int] = field(default_factory=list)
    num_prompt_tokens: int = 0
    num_computed: int = 0
    block_table: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None
    error: str | None = None
    adapter_weights: dict[int, float] = field(default_factory=dict)  # LoRA slot -> weight
    steer_vectors: dict[str, tuple[float, list[int] | None]] = field(default_factory=dict)
    _steer_delta: torch.Tensor | None = field(default=None, repr=False)  # see steer_delta
    steer_epoch: int = 0  # counts changes of the row's vectors (each drops steer_delta)
    steer_version: int = 0  # which computation of steer_delta it is (engine-wide counter)
    steering: Any = None  # models.engine.steering.RowSteering when request.steering is set
    matcher: Any = None  # a protocol TokenMatcher when request.constraint is set
    grammar_moves: int = 0  # tokens taken or rolled back by the matcher (stale prepared masks)
    logprobs: list[TokenLogprob | None] = field(default_factory=list)  # per generated token
    interventions: list[Intervention] = field(default_factory=list)  # not yet reported
    num_sent_tokens: int = 0
    num_sent_chars: int = 0
    forced_text: str | None = None  # ForceOutput: the whole completion text
    stopped_by_token: bool = False  # finished on EOS / a stop token: its text is not returned
    stop_text_index: int | None = None  # finished on a stop string starting at this character
    decoded_tokens: int = 0  # generated tokens whose text is cached in decoded_text
    decoded_text: str = ""
    # prefix caching (models.engine.block_manager): chained hashes of the full blocks of
    # token_ids seeded by cache_key, how many leading blocks were offered to the cache, and
    # steer_epoch at admission (blocks computed after a vector change are not cached)
    cache_key: bytes = b""
    block_hashes: list[bytes] = field(default_factory=list)
    num_committed: int = 0
    cache_epoch: int = -1
    speculation_off: bool = False  # reported once: this row is not speculated (and why)
    speculation: SpeculationStats | None = None  # a speculating row's k and draft counters
    hidden_layers: tuple[int, ...] = ()  # big-model layers this row reads (request + policy)
    hidden: torch.Tensor | None = None  # their residual stream [layers, hidden] at the last step
    hidden_prompt_positions: int = 1  # last prompt tokens captured at the end of the prefill
    prompt_hidden: torch.Tensor | None = None  # those [positions, layers, hidden]
    activations: dict[int, torch.Tensor] = field(default_factory=dict)  # step -> for the client

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.request.prompt_token_ids)
            self.num_prompt_tokens = len(self.token_ids)
        self.hidden_layers = row_layers(self)
        self.hidden_prompt_positions = row_prompt_positions(self)

    @property
    def steer_delta(self) -> torch.Tensor | None:
        """Sum of coeff * vector [layers, hidden], cached; None = recompute (vectors changed)."""
        return self._steer_delta

    @steer_delta.setter
    def steer_delta(self, value: torch.Tensor | None) -> None:
        if value is None:
            self.steer_epoch += 1
        self._steer_delta = value

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def generated_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    def append(self, token_ids: list[int], logprobs: list[TokenLogprob | None]) -> None:
        self.token_ids.extend(token_ids)
        self.logprobs.extend(logprobs)

    def truncate(self, num_generated: int) -> None:
        """Keep only the first `num_generated` generated tokens; their K/V stays valid except
        for the last kept token, which the next step runs again to get its logits."""
        self.token_ids = self.token_ids[: self.num_prompt_tokens + num_generated]
        del self.logprobs[num_generated:]
        self.decoded_tokens, self.decoded_text = 0, ""
        self.num_computed = min(self.num_computed, len(self.token_ids) - 1)

    def reset_for_recompute(self) -> None:
        """Preempted: every token must be run again once it is rescheduled."""
        self.num_computed = 0
        self.block_table = []
        self.status = SequenceStatus.WAITING
