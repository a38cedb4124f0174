"""LLMEngine: the synchronous core. add_request / abort / step() -> outputs, one thread.

A step: apply async steering answers that arrived, schedule, run the model once for every
scheduled row, make the step's observer call for steered rows, sample, check stops, and
collect the final parts of each row's output. Not thread-safe: TorchEngine drives it from
its own engine thread.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import Any

import torch

from models.engine.adapters import LoRAAdapters
from models.engine.admission import (
    check_context,
    check_generation,
    check_speculative,
    check_token_ids,
)
from models.engine.block_manager import BlockManager
from models.engine.config import EngineConfig
from models.engine.constraints import RowConstraints
from models.engine.device import stack_rows, to_device
from models.engine.hidden_capture import HiddenReader
from models.engine.model_runner import ModelRunner
from models.engine.output import OutputBuilder, finish
from models.engine.prefix_cache import content_key, vector_digest
from models.engine.sampler import sample
from models.engine.scheduler import ScheduledSequence, Scheduler
from models.engine.sequence import Sequence
from models.engine.speculative import Speculator
from models.engine.steering_hooks import (
    RowSteering,
    SequenceEditor,
    SteeringHooks,
    apply_adjustments,
)
from models.protocol.drafter import Drafter
from models.protocol.errors import (
    EngineError,
    EngineOverloadedError,
    PromptTooLongError,
    VectorNotFoundError,
)
from models.protocol.outputs import EngineStats, RequestOutput, SpeculationStats
from models.protocol.requests import GenerationRequest
from models.protocol.steering import (
    MAX_STEER_COEFF,
    Added,
    AdjustedLogits,
    Sampled,
    StepObserver,
)

log = logging.getLogger(__name__)


def error_output(seq: Sequence) -> RequestOutput:
    """The last output of a row whose output could not be built: its error, no text."""
    return RequestOutput(seq.request_id, [], "", finished=True, finish_reason="error",
                         num_prompt_tokens=seq.num_prompt_tokens,
                         num_generated_tokens=seq.num_generated, error=seq.error)  # fmt: skip


def load_tokenizer(model_path: str | Path) -> Any | None:
    """The checkpoint's tokenizer, or None when the directory has none (token-level use)."""
    path = Path(model_path)
    if not any((path / n).exists() for n in ("tokenizer.json", "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def eos_token_ids(model_path: str | Path) -> set[int]:
    """EOS ids from generation_config.json and config.json."""
    ids: set[int] = set()
    for name in ("generation_config.json", "config.json"):
        file = Path(model_path) / name
        if file.exists():
            value = json.loads(file.read_text()).get("eos_token_id")
            ids.update(value if isinstance(value, list) else [] if value is None else [value])
    return ids


class LLMEngine(SequenceEditor):
    """Continuous-batching generation over a paged KV cache, with steering and LoRA hooks."""

    def __init__(self, config: EngineConfig, model_path: str | Path, tokenizer: Any = "auto"):
        self.config = config
        self.tokenizer = load_tokenizer(model_path) if tokenizer == "auto" else tokenizer
        args_len = json.loads((Path(model_path) / "config.json").read_text()).get(
            "max_position_embeddings", 4096
        )
        self.max_model_len = config.max_model_len or args_len
        self.runner = ModelRunner(config, model_path, self.max_model_len)
        self.args = self.runner.args
        self.blocks = BlockManager(
            self.runner.num_blocks, config.block_size, config.prefix_caching, self.runner.copy_block
        )
        self.blocks.content_key = self._content_key
        self.scheduler = Scheduler(self.blocks, config.max_num_seqs, config.max_num_batched_tokens)
        self.outputs = OutputBuilder(self.tokenizer, eos_token_ids(model_path), self.max_model_len)
        self.adapters = LoRAAdapters(self.runner.model, config)
        self.steering = SteeringHooks(self)
        self.constraints = RowConstraints(config.structured_output, self.tokenizer,
                                          self.args.vocab_size, self.outputs.eos_token_ids,
                                          self.runner.device)  # fmt: skip
        self.hidden = HiddenReader(self.args.num_layers)
        self.vectors: dict[str, torch.Tensor] = {}
        self._steer_versions = 0  # a new number for every row delta computed
        self._steer_stack: tuple[tuple[int, ...], torch.Tensor | None] = ((), None)
        self.seqs: dict[str, Sequence] = {}
        self.speculator: Speculator | None = None
        self._seed_source = random.Random(config.seed)
        self._arrivals = 0
        self._stats = EngineStats(total_blocks=self.blocks.num_usable)
        self.graph_capture_s = self.runner.capture_graphs()  # after the LoRA slots exist

    def check_request(self, request: GenerationRequest) -> None:
        """Raise the EngineError a request deserves, without changing anything."""
        check_generation(request, self.args.vocab_size, self.max_model_len)
        self._check_blocks(len(request.prompt_token_ids), request.params.max_tokens)
        if request.request_id in self.seqs:
            raise EngineError(f"request id '{request.request_id}' is already running")
        if len(self.scheduler.waiting) >= self.config.max_queue_len:
            raise EngineOverloadedError(
                f"the engine queue is full ({self.config.max_queue_len} waiting); retry later"
            )
        for spec in request.steer_vectors:
            self._check_vector(spec.name, spec.layers)
        if request.steering is not None and self.steering.observer is None:
            raise EngineError("steering policy requested but no step observer is set")
        self._check_hidden_layers(request)
        check_speculative(request, self.speculator is not None, self.config.speculative.max_k)
        self.adapters.check(request)
        self.constraints.check(request)

    def _check_token_ids(self, token_ids: list[int], what: str) -> None:
        check_token_ids(token_ids, self.args.vocab_size, what)

    def _check_hidden_layers(self, request: GenerationRequest) -> None:
        asked = list(request.hidden_layers)
        if request.steering is not None:  # (both raise EngineError on a malformed value)
            asked += request.steering.hidden_layers
            request.steering.hidden_prompt_positions  # noqa: B018
        try:
            self.hidden.check(asked, "hidden_layers")
        except ValueError as exc:
            raise EngineError(str(exc), param="hidden_layers") from None

    def _check_length(self, num_prompt: int, max_tokens: int) -> None:
        check_context(num_prompt, max_tokens, self.max_model_len)
        self._check_blocks(num_prompt, max_tokens)

    def _check_blocks(self, num_prompt: int, max_tokens: int) -> None:
        total = num_prompt + max_tokens
        blocks = self.blocks.blocks_for(total)
        if blocks > self.blocks.num_usable:
            raise PromptTooLongError(
                f"the prompt ({num_prompt} tokens) plus max_tokens ({max_tokens}) needs {blocks} "
                f"KV-cache blocks; the cache has {self.blocks.num_usable}",
                param="max_tokens",
            )

    def add_request(self, request: GenerationRequest) -> None:
        self.check_request(request)
        seed = request.params.seed
        if seed is None:
            seed = self._seed_source.randrange(1 << 62)
        generator = torch.Generator(device=self.runner.device).manual_seed(seed)
        seq = Sequence(request, generator, self._arrivals)
        self._arrivals += 1
        seq.adapter_weights = self.adapters.acquire(request)
        self.reset_vectors(seq)
        if request.steering is not None:
            seq.steering = RowSteering(request.steering)
        self.constraints.start(seq)
        if self.speculator is not None and (k := self.speculator.row_k(request)):
            seq.speculation = SpeculationStats(k)
        self.seqs[request.request_id] = seq
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> None:
        seq = self.seqs.get(request_id)
        if seq is None or seq.is_finished:
            return
        finish(seq, "abort")

    def fail_all(self, message: str) -> list[RequestOutput]:
        """Finish every request with an error (after a step raised); the engine stays usable."""
        for seq in self.seqs.values():
            if not seq.is_finished:
                finish(seq, "error", message)
        outputs = [out for seq in self.seqs.values() if (out := self.outputs.collect(seq))]
        self._release_finished(drop=True)
        return outputs

    def has_unfinished(self) -> bool:
        return bool(self.seqs)

    def step(self) -> list[RequestOutput]:
        self.steering.poll()
        unparked = self.steering.take_unparked()  # their answer came: sample, then run them
        if unparked:
            self._append_tokens([(s, lg, self.steering.take_adjustment(s)) for s, lg in unparked])
        self._release_finished(drop=False)
        scheduled = self.scheduler.schedule()
        if self.speculator is not None and scheduled:
            used = sum(item.num_tokens for item in scheduled)
            self.speculator.draft(scheduled, self.blocks, self.config.max_num_batched_tokens - used)
        outputs: list[RequestOutput] = []
        if scheduled:
            self._run(scheduled)
        elif self.steering.parked:  # only rows waiting for the Steerer: wait with them
            self.steering.wait_parked()
        self.hidden.to_host()
        for seq in list(self.seqs.values()):
            held = seq.steering.held_tokens if seq.steering is not None else 0
            try:
                out = self.outputs.collect(seq, held)
            except Exception as exc:  # noqa: BLE001 - this row's text: it fails alone
                self.fail_row(seq, "building the output", exc)
                out = error_output(seq)
            if out is not None:
                outputs.append(out)
        self._release_finished(drop=True)
        self._update_stats(scheduled)
        return outputs

    def _run(self, scheduled: list[ScheduledSequence]) -> None:
        seqs = [item.seq for item in scheduled]
        counts = self.speculator.logit_counts(scheduled) if self.speculator else None
        plan = self.hidden.plan(scheduled)
        logits = self.runner.run(scheduled, self._steer_deltas(seqs), self.adapters.weights(seqs),
                                 counts, plan)  # fmt: skip
        # grammar masks on the host while the forward runs on the device (not for drafts)
        self.constraints.prepare([it.seq for it in scheduled if it.samples] if counts is None else [])
        self.hidden.distribute(seqs, self.runner.hidden, plan)
        samples = [item.samples for item in scheduled]  # (before num_computed moves)
        for item in scheduled:
            item.seq.num_computed += item.num_tokens
        if counts is not None:
            logits, verified = self.speculator.split(logits, scheduled, counts)
            self._accept_drafts(verified)
            samples = [
                s and it.seq not in verified for it, s in zip(scheduled, samples, strict=True)
            ]
        # the small model starts now, before any other host work of the step
        self.steering.prefetch([item.seq for item, s in zip(scheduled, samples, strict=True) if s])
        rows = zip(scheduled, logits.unbind(0), samples, strict=True)
        sampling = [(item.seq, row) for item, row, s in rows if s]
        self.steering.consult(sampling, self._stats.steps)
        adjustments = [self.steering.take_adjustment(s) for s, _ in sampling]
        parked = self.steering.is_parked
        ready = [(s, lg, adjust) for (s, lg), adjust in zip(sampling, adjustments, strict=True)
                 if not s.is_finished and s.num_uncomputed == 0 and not parked(s)]  # fmt: skip
        self._append_tokens(ready)

    def _append_tokens(self, ready: list[tuple[Sequence, torch.Tensor, Any]]) -> None:
        """Sample the rows (seq, logits, adjustment) and append their tokens."""
        for seq, (token, logprob) in self._sample_rows(ready):
            step = seq.num_generated
            seq.append([token], [logprob])
            if seq.hidden is not None:
                self.hidden.record(seq, step)
            self._stats.generated_tokens += 1
            try:
                self.steering.record(seq, Sampled(step=step, token_id=token))
                self.outputs.check_stop(seq, sampled=True)
                self.constraints.advance(seq, [token])
            except Exception as exc:  # noqa: BLE001 - this row's stop check: it fails alone
                self.fail_row(seq, "checking stop conditions", exc)

    def _sample_rows(self, ready: list[tuple[Sequence, torch.Tensor, Any]]) -> list[tuple]:
        """(seq, (token, logprob)) for the ready rows (seq, logits, adjustment), sampled in
        one batch; if that raises, row by row, so that a row whose adjustment or sampling
        fails is finished with an error alone and the others get their token."""
        try:
            return list(zip([s for s, *_ in ready], self._sample(ready), strict=True))
        except Exception:  # noqa: BLE001 - find the row(s) at fault below
            if len(ready) > 1:
                log.warning("sampling a batch of %d rows failed; sampling row by row", len(ready))
        sampled = []
        for row in ready:
            try:
                sampled.append((row[0], self._sample([row])[0]))
            except Exception as exc:  # noqa: BLE001 - this row fails alone
                self.fail_row(row[0], "sampling", exc)
        return sampled

    def _sample(self, ready: list[tuple[Sequence, torch.Tensor, Any]]) -> list[tuple]:
        """Sample rows (seq, logits [vocab], AdjustedLogits or None) as one batch: steering
        adjustments first, then each row's grammar mask."""
        seqs = [s for s, *_ in ready]
        logits = stack_rows([lg for _, lg, _ in ready])  # rows of one output: no copy
        logits = apply_adjustments(logits, [adjust for *_, adjust in ready])
        logits = self.constraints.apply(logits, seqs)
        return sample(logits, seqs, self.outputs.eos_token_ids)

    def fail_row(self, seq: Sequence, what: str, exc: BaseException) -> None:
        """Finish one row with an error: something raised while stepping it alone."""
        log.warning("request %s: %s failed: %r", seq.request_id, what, exc)
        self._stats.failed_rows += 1
        if not seq.is_finished:
            finish(seq, "error", f"{what} failed for this request: {exc!r}")

    def set_drafter(self, drafter: Drafter | None) -> None:
        """Speculative decoding with `drafter` (None: off) for requests admitted from now on;
        k from config.speculative.k and each request's speculative_k."""
        self.speculator = None
        if drafter is not None:
            self.speculator = Speculator(drafter, self.config.speculative.k, self.args.vocab_size,
                                         self.max_model_len)  # fmt: skip

    def _accept_drafts(self, verified: dict[Sequence, torch.Tensor]) -> None:
        for seq, logits in verified.items():
            for token, logprob in self.speculator.accept(seq, logits):
                seq.append([token], [logprob])
                self.outputs.check_stop(seq, sampled=True)
                self._stats.generated_tokens += 1
                if seq.is_finished:
                    break
            seq.num_computed = min(seq.num_computed, len(seq.token_ids) - 1)
            self.blocks.shrink(seq, len(seq.token_ids))

    def _release_finished(self, drop: bool) -> None:
        """Free the blocks and adapter slots of finished rows; `drop` forgets them (after
        their final output was collected)."""
        for seq in [s for s in self.seqs.values() if s.is_finished]:
            self.scheduler.remove(seq)
            self.adapters.release(seq)
            if drop:
                del self.seqs[seq.request_id]
                if self.speculator is not None:
                    self.speculator.release([seq.request_id])

    def _update_stats(self, scheduled: list[ScheduledSequence]) -> None:
        s = self._stats
        if scheduled:
            s.steps += 1
        s.num_running = len(self.scheduler.running)
        s.num_waiting = len(self.scheduler.waiting)
        s.max_running_seen = max(s.max_running_seen, len(scheduled))
        s.free_blocks = self.blocks.num_free
        s.preemptions = self.scheduler.num_preemptions
        s.observer_calls = self.steering.num_calls
        s.prefix_cache_hit_rate = self.blocks.hit_rate
        if self.speculator is not None:
            s.speculative_proposed = self.speculator.num_proposed
            s.speculative_accepted = self.speculator.num_accepted

    def stats(self) -> EngineStats:
        return EngineStats(**self._stats.__dict__)

    def set_step_observer(self, observer: StepObserver | None) -> None:
        """`observer.on_step(list[RowEvents]) -> list[RowActions]` (a coroutine or not), once
        per engine step for all steered rows that are due."""
        self.steering.observer = observer

    def register_vector(self, name: str, vector: torch.Tensor) -> None:
        """A steering vector [num_layers, hidden]: row h_l += coeff * vector[l] after layer l."""
        expected = (self.args.num_layers, self.args.hidden_size)
        if tuple(vector.shape) != expected:
            raise EngineError(
                f"steering vector '{name}' has shape {tuple(vector.shape)}; this model needs "
                f"[num_layers, hidden] = {list(expected)}"
            )
        vector = vector.detach().float().cpu()
        if not bool(torch.isfinite(vector).all()):
            raise EngineError(f"steering vector '{name}' holds NaN or infinite values")
        self.vectors[name] = vector
        for seq in self.seqs.values():  # a replaced vector changes the cached row sums
            seq.steer_delta = None

    def _check_vector(self, name: str, layers: list[int] | None) -> None:
        if name not in self.vectors:
            raise VectorNotFoundError.naming(name, self.vectors, param="steering.vectors")
        bad = [x for x in layers or [] if not 0 <= x < self.args.num_layers]
        if bad:
            raise EngineError(
                f"steering vector '{name}': layers {bad} outside [0, {self.args.num_layers})"
            )

    def _steer_deltas(self, seqs: list[Sequence]) -> torch.Tensor | None:
        """Per-row deltas [layers, rows, hidden] in the model's dtype (zero rows unsteered), or
        None if no row is steered. While the rows and their vectors stay the same, every step
        gets the same tensor (no new stack; the graph runner then skips its copy too)."""
        if not any(s.steer_vectors for s in seqs):
            return None
        for seq in seqs:
            if seq.steer_vectors and seq.steer_delta is None:
                try:
                    delta = self._row_delta(seq)
                except Exception as exc:  # noqa: BLE001 - this row's vectors: it fails alone
                    self.fail_row(seq, "adding steering vectors", exc)
                    seq.steer_vectors = {}
                    continue
                seq.steer_delta = to_device(delta, torch.float32, self.runner.device)
                self._steer_versions += 1
                seq.steer_version = self._steer_versions
        key = tuple(s.steer_version if s.steer_vectors else 0 for s in seqs)
        if key != self._steer_stack[0]:
            zero = torch.zeros(
                self.args.num_layers, self.args.hidden_size, device=self.runner.device
            )
            rows = [s.steer_delta if s.steer_vectors else zero for s in seqs]
            self._steer_stack = key, torch.stack(rows, dim=1).to(self.runner.dtype)
        return self._steer_stack[1]

    def _content_key(self, seq: Sequence) -> bytes:
        """Prefix caching: what besides its tokens decides the K/V of seq's blocks."""
        vectors = [
            (name, coeff, layers, vector_digest(self.vectors[name]))
            for name, (coeff, layers) in seq.steer_vectors.items()
        ]
        return content_key(self.adapters.identity(seq), vectors)

    def _row_delta(self, seq: Sequence) -> torch.Tensor:
        delta = torch.zeros(self.args.num_layers, self.args.hidden_size)
        for name, (coeff, layers) in seq.steer_vectors.items():
            picked = slice(None) if layers is None else torch.tensor(layers, dtype=torch.long)
            delta[picked] += coeff * self.vectors[name][picked]
        return delta

    # SequenceEditor: what steering actions do to a sequence

    def replace_prompt(self, seq: Sequence, token_ids: list[int]) -> None:
        if seq.num_generated:
            raise EngineError(
                f"AdjustedPrefill arrived after {seq.num_generated} tokens were generated"
            )
        if not token_ids:
            raise EngineError("AdjustedPrefill with an empty prompt")
        self._check_token_ids(token_ids, "AdjustedPrefill")
        self._check_length(len(token_ids), seq.request.params.max_tokens)
        self.blocks.release(seq)
        seq.token_ids, seq.num_prompt_tokens, seq.num_computed = list(token_ids), len(token_ids), 0
        seq.steering.prefilled_reported = False

    def force_tokens(self, seq: Sequence, token_ids: list[int]) -> None:
        self._check_token_ids(token_ids, "ForceTokens")
        room = seq.request.params.max_tokens - seq.num_generated
        token_ids = list(token_ids)[:room]
        step = seq.num_generated
        seq.append(token_ids, [None] * len(token_ids))
        self.steering.record(seq, Added(step=step, token_ids=token_ids, forced=True))
        self.outputs.check_stop(seq, sampled=False)
        self.constraints.advance(seq, token_ids)

    def backtrack(self, seq: Sequence, n: int) -> None:
        unsent = seq.num_generated - seq.num_sent_tokens
        if n < 0 or n > unsent:
            held = seq.steering.held_tokens if seq.steering is not None else 0
            raise EngineError(
                f"Backtrack({n}) reaches past what the client already received: only {unsent} "
                f"generated tokens are unsent (steering params max_backtrack={held})"
            )
        seq.truncate(seq.num_generated - n)
        self.blocks.shrink(seq, len(seq.token_ids))
        self.constraints.rollback(seq, n)

    def force_output(self, seq: Sequence, text: str) -> None:
        sent = self.outputs.completion_text(seq)[: seq.num_sent_chars]
        seq.forced_text = text if text.startswith(sent) else sent + text
        finish(seq, "stop")

    def set_vector(self, seq: Sequence, name: str, coeff: float, layers: list[int] | None):
        self._check_vector(name, layers)
        if not abs(coeff) <= MAX_STEER_COEFF:  # NaN too
            raise EngineError(
                f"SteerVector '{name}': coeff {coeff} outside [-{MAX_STEER_COEFF:g}, "
                f"{MAX_STEER_COEFF:g}]"
            )
        seq.steer_vectors[name] = (coeff, layers)
        seq.steer_delta = None

    def clear_vector(self, seq: Sequence, name: str | None) -> None:
        if name is None:
            seq.steer_vectors.clear()
        else:
            seq.steer_vectors.pop(name, None)
        seq.steer_delta = None

    def check_logits(self, action: AdjustedLogits) -> None:
        vocab = self.args.vocab_size
        for name in ("logits", "delta"):
            tensor = getattr(action, name)
            if tensor is not None and tuple(tensor.shape) != (vocab,):
                raise EngineError(
                    f"AdjustedLogits.{name} has shape {tuple(tensor.shape)}; this model needs "
                    f"[{vocab}]"
                )
        alpha = action.plausibility_alpha
        if alpha is not None and not 0 <= alpha <= 1:
            raise EngineError(f"AdjustedLogits.plausibility_alpha {alpha} outside [0, 1]")

    def reset_vectors(self, seq: Sequence) -> None:
        seq.steer_vectors = {s.name: (s.coeff, s.layers) for s in seq.request.steer_vectors}
        seq.steer_delta = None
