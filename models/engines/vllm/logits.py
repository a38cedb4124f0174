"""Logit policies inside vLLM: a vLLM logits processor that runs Tandem's steering runtime.

vLLM builds `SteeringLogitsProcessor` in its engine process (where the model runs) with the
engine's config; the Tandem steering setup rides in `additional_config` (SETUP_KEY), and each
steered request names its policy and parameters in `SamplingParams.extra_args` (ARGS_KEY). Every
step, the processor hands all steered rows' events (Prefilled once, then ForwardPass with the
row's logits and the sequence so far) to ONE call of a colocated SteeringRuntime (small model
and policies loaded in that process) and applies the AdjustedLogits it answers the way the torch
engine does (models.engine.steering_hooks.apply_adjustments), before vLLM samples. So every
steering mode behaves like `colocated` here: the step waits for its adjustment.

Only AdjustedLogits (and Noop) can be applied here; the engine's capabilities refuse policies
that need more. A runtime error leaves the row unsteered, logged (vLLM gives a logits processor
no way to report on a request).

It also closes constrained output in time, as the torch engine does (models.engine.constraints):
vLLM applies its grammar bitmask before the logits processors, so in the last CLOSE_WITHIN
tokens of a constrained row's budget (or the second half of a shorter one), among the tokens
the grammar left it keeps the first non-empty tier of CLOSING_TIERS (tokens that end a string,
then `}]`, then the shortest values). A toy model that would fill a string up to max_tokens
then still ends with JSON that parses.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

from models.engine.constraints import CLOSE_WITHIN, CLOSING_TIERS
from models.engine.llm_engine import load_tokenizer
from models.engine.steering_hooks import apply_adjustments
from models.protocol.requests import GenerationRequest
from models.protocol.steering import AdjustedLogits, ForwardPass, Noop, Prefilled, RowEvents
from models.steering.config import SteeringSetup
from models.steering.runtime import SteeringRuntime

log = logging.getLogger(__name__)
SETUP_KEY = "tandem_steering"  # additional_config: SteeringSetup as JSON
ARGS_KEY = "tandem_steering"  # SamplingParams.extra_args: {request_id, policy, params}
PROCESSOR = "models.engines.vllm.logits:SteeringLogitsProcessor"


def steering_args(request: GenerationRequest) -> dict | None:
    """The per-request arguments of a steered request (None: not steered)."""
    s = request.steering
    if s is None:
        return None
    return {ARGS_KEY: {"request_id": request.request_id, "policy": s.policy,
                       "params": dict(s.params)}}  # fmt: skip


def _constrained_row(params, prompt_ids, output_ids: list[int]):
    """A constrained row's budget and vLLM's live list of its output ids (None: not one)."""
    if params.structured_outputs is None or params.max_tokens is None:
        return None
    return params.max_tokens, output_ids


@dataclass
class SteeredRow:
    """A steered request in vLLM's batch: its ids, and vLLM's live list of its output ids."""

    request_id: str
    policy: str
    params: dict
    prompt_ids: list[int]
    output_ids: list[int]
    enabled: bool = True
    prefilled: bool = False
    events: list = field(default_factory=list)


class SteeringLogitsProcessor(LogitsProcessor):
    """Applies the configured logit policies to the rows that asked (see the module docstring)."""

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        setup = (vllm_config.additional_config or {}).get(SETUP_KEY)
        self.runtime = (
            SteeringRuntime.from_setup(SteeringSetup.model_validate(setup)) if setup else None
        )
        self.rows: dict[int, SteeredRow] = {}
        self.closing: dict[int, tuple[int, list[int]]] = {}  # constrained: (max_tokens, output)
        self.tokenizer_path = vllm_config.model_config.tokenizer
        self.tiers: torch.Tensor | None = None  # [len(CLOSING_TIERS), vocab] bool

    def is_argmax_invariant(self) -> bool:
        return False  # it changes which token greedy decoding picks

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is not None and self.runtime is not None:
            gone = [self.rows[i].request_id for i in batch_update.removed if i in self.rows]
            if gone:
                self.runtime.release(gone)
        process_dict_updates(self.rows, batch_update, self._new_row)
        process_dict_updates(self.closing, batch_update, _constrained_row)

    def _new_row(self, params, prompt_ids: list[int] | None, output_ids: list[int]):
        args = (params.extra_args or {}).get(ARGS_KEY)
        if args is None or self.runtime is None:
            return None
        return SteeredRow(args["request_id"], args["policy"], args["params"],
                          list(prompt_ids or []), output_ids)  # fmt: skip

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return self._close(self._steer(logits))

    def _close(self, logits: torch.Tensor) -> torch.Tensor:
        """Constrained rows near the end of their budget keep only closing tokens (if any)."""
        due = [i for i, (max_tokens, output) in self.closing.items()
               if max_tokens - len(output) <= min(CLOSE_WITHIN, max_tokens // 2)]  # fmt: skip
        if not due:
            return logits
        tiers = self._tiers(logits.shape[-1], logits.device)
        for i in due:
            allowed = logits[i] > float("-inf")
            for tier in tiers:
                closing = allowed & tier
                if bool(closing.any()):
                    logits[i] = logits[i].masked_fill(~closing, float("-inf"))
                    break
        return logits

    def _tiers(self, vocab: int, device: torch.device) -> torch.Tensor:
        if self.tiers is None or self.tiers.shape[-1] != vocab or self.tiers.device != device:
            tokenizer = load_tokenizer(self.tokenizer_path)
            count = min(vocab, len(tokenizer))
            texts = tokenizer.batch_decode([[i] for i in range(count)])
            self.tiers = torch.zeros(len(CLOSING_TIERS), vocab, dtype=torch.bool)
            for t, tier in enumerate(CLOSING_TIERS):
                self.tiers[t, :count] = torch.tensor([bool(x) and tier(x) for x in texts])
            self.tiers = self.tiers.to(device)
        return self.tiers

    def _steer(self, logits: torch.Tensor) -> torch.Tensor:
        live = [(i, row) for i, row in self.rows.items() if row.enabled]
        if not live:
            return logits
        batch = []
        for i, row in live:
            events = [] if row.prefilled else [Prefilled(prompt_ids=row.prompt_ids)]
            row.prefilled = True
            events.append(ForwardPass(step=len(row.output_ids), logits=logits[i].float()))
            batch.append(RowEvents(
                request_id=row.request_id, events=events, policy=row.policy, params=row.params,
                num_prompt_tokens=len(row.prompt_ids),
                token_ids=row.prompt_ids + list(row.output_ids), mode="colocated",
            ))  # fmt: skip
        answers = {a.request_id: a for a in self.runtime.on_step(batch)}
        adjustments: list[AdjustedLogits | None] = [None] * logits.shape[0]
        for i, row in live:
            answer = answers.get(row.request_id)
            if answer is None:
                continue
            if answer.error:
                log.warning("steering %s failed; unsteered from here: %s", row.request_id,
                            answer.error)  # fmt: skip
                row.enabled = False
                continue
            for action in answer.actions:
                if isinstance(action, AdjustedLogits) and action.step == len(row.output_ids):
                    adjustments[i] = action
                elif not isinstance(action, (AdjustedLogits, Noop)):
                    log.warning("the vllm engine cannot apply %s (request %s); unsteered",
                                type(action).__name__, row.request_id)  # fmt: skip
                    row.enabled = False
        return apply_adjustments(logits, adjustments)
