"""SteeringRuntime: the small model and the policies, turning one engine step's events into
actions. The same object runs colocated (the engine's step observer inside the Generator) and
remote (inside the Steerer deployment)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import sys
import threading
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from models.protocol.small_model import SmallModel
from models.protocol.steering import (
    Action,
    Added,
    AdjustedLogits,
    ForwardPass,
    PrefetchRow,
    Prefilled,
    RowActions,
    RowEvents,
    Sampled,
    StepObserver,
    check_legal_after,
)
from models.steering.config import SteeringConfig, SteeringSetup
from models.steering.policies import Policy, PolicyContext, policy_class
from models.steering.state import RequestState, variant_name

log = logging.getLogger(__name__)
NO_READS: tuple[list[str], list[int]] = ([], [])  # a policy that reads no small-model output


@dataclass
class RuntimeStats:
    """Counters for metrics and tests."""

    calls: int = 0
    rows: int = 0
    small_model_reads: int = 0
    resyncs: int = 0
    errors: int = 0
    live_requests: int = 0
    read_ahead_hits: int = 0
    read_ahead_misses: int = 0
    prefetched_rows: int = 0  # (request, variant) reads started by `prefetch`


class SteeringRuntime(StepObserver):
    """Holds the small model and the configured policies; keeps per-request state by id.

    config: the `steering:` block. big_model_path: the big model's checkpoint (its tokenizer and
    vocab size are checked against the small model's). small_model_path: the steering model;
    small_adapters: its LoRA adapters by name (the proxy-tuning expert among them).
    """

    def __init__(
        self,
        config: SteeringConfig,
        big_model_path: str | None,
        small_model_path: str | None = None,
        small_adapters: dict[str, str] | None = None,
        max_model_len: int | None = None,
    ):
        self.config = config
        self.states: OrderedDict[str, RequestState] = OrderedDict()  # least recent first
        self._stats = RuntimeStats()
        self._lock = threading.Lock()  # one step at a time, whichever event loop calls
        self._released: list[str] = []
        self.small_model: SmallModel | None = None
        expert, adapters = _adapters_to_load(config, small_adapters or {})
        if config.policies:
            if small_model_path is None:
                raise ValueError(
                    "steering policies are configured but there is no small model: set "
                    "steering.small_model_source or use a builtin model source"
                )
            max_len = config.max_model_len or max_model_len
            self.small_model = load_small_model(config, small_model_path, adapters, max_len)
        self.context = PolicyContext(
            small_model=self.small_model,
            big_model_path=big_model_path,
            big_vocab_size=_vocab_size(big_model_path, self.small_model),
            big_tokenizer=_tokenizer(big_model_path),
            vectors={v.name: v for v in config.vectors},
            expert_adapter=expert,
        )
        self.policies: dict[str, Policy] = {}
        self._variants: dict[str, tuple[list[str], list[int]]] = {}  # policy -> what it reads
        for spec in config.policies:
            policy = policy_class(spec.kind)(spec.name, spec.params, self.context)
            policy.start()
            self.policies[spec.name] = policy
            self._variants[spec.name] = (list(policy.variants), list(policy.hidden_layers))

    @classmethod
    def from_source(
        cls, config: SteeringConfig, model_source: str, max_model_len: int | None = None
    ) -> SteeringRuntime:
        """Build from the config and the big model's `model.source` (builtin:… or a directory);
        max_model_len: the big model's context (engine.max_model_len), if set."""
        from models.builtin import resolve_source

        small, adapters = small_model_source(config, model_source)
        return cls(config, resolve_source(model_source).big, small, adapters, max_model_len)

    @classmethod
    def from_setup(cls, setup: SteeringSetup) -> SteeringRuntime:
        return cls.from_source(setup.steering, setup.model_source, setup.max_model_len)

    async def process(self, batch: list[RowEvents]) -> list[RowActions]:
        """The actions for every row of one engine step; one small-model forward for all rows
        that need it. A row's failure is reported on that row (RowActions.error) only."""
        return await asyncio.to_thread(self._process_locked, batch)

    def on_step(self, batch: list[RowEvents]) -> list[RowActions]:
        """The engine's step-observer hook when colocated: runs in the caller's thread (the
        engine's, which waits for the answer anyway), so no event-loop hop per step."""
        return self._process_locked(batch)

    def prefetch(self, rows: list[PrefetchRow]) -> None:
        """Start the small model's read of these requests' tokens without waiting for it (on CUDA it runs on the small
        model's side stream). Colocated, the engine calls this right after it queued the big
        model's forward, so the two forwards share the GPU; the step's `on_step` then finds
        the outputs current. Requests not seen yet (no state) wait for that call."""
        if self.small_model is None:
            return
        limit = self.small_model.max_len or sys.maxsize
        with self._lock:
            reads, layers = [], set()
            states, plans = self.states, self._variants
            for request_id, token_ids, num_prompt, _ in rows:
                state = states.get(request_id)
                if state is None or len(token_ids) > limit:  # (a longer one errs in the step)
                    continue
                variants, hidden = plans.get(state.policy, NO_READS)
                if variants:
                    state.sync(token_ids, num_prompt)
                    reads += [(state, variant) for variant in variants]
                    if hidden:
                        layers.update(hidden)
            if reads:
                self.small_model.read(reads, hidden_layers=sorted(layers), background=True)
                self._stats.prefetched_rows += len(reads)

    def release(self, request_ids: Iterable[str]) -> None:
        """Forget finished requests (their caches are freed). Never blocks: while a step is
        being processed the ids wait for the next one."""
        self._released.extend(request_ids)
        if self._lock.acquire(blocking=False):
            try:
                self._drop_released()
            finally:
                self._lock.release()

    def _drop_released(self) -> None:
        while self._released:
            request_id = self._released.pop()
            try:
                self._forget(request_id)
            except Exception:  # noqa: BLE001 - a cache that will not free must not stop a step
                log.exception("freeing the state of %s failed", request_id)

    def _forget(self, request_id: str) -> None:
        state = self.states.pop(request_id, None)
        if state is not None and self.small_model is not None:
            self.small_model.free(state)

    def stats(self) -> RuntimeStats:
        self._stats.live_requests = len(self.states)
        return RuntimeStats(**vars(self._stats))

    def _process_locked(self, batch: list[RowEvents]) -> list[RowActions]:
        with self._lock:
            return self.process_now(batch)

    def process_now(self, batch: list[RowEvents]) -> list[RowActions]:
        """`process` in the caller's thread, without the lock (for callers that own both)."""
        self._drop_released()
        self._stats.calls += 1
        self._stats.rows += len(batch)
        answers: list[RowActions | None] = [None] * len(batch)
        live: list[tuple[int, RowEvents, RequestState, Policy]] = []
        for i, row in enumerate(batch):
            try:
                prepared = self._prepare(row)
            except Exception as exc:  # noqa: BLE001 - reported on the row
                answers[i] = self._error(row, exc)
                continue
            if isinstance(prepared, RowActions):
                answers[i] = prepared
            else:
                live.append((i, row, *prepared))
        reads = [(state, variant) for _, _, state, policy in live for variant in policy.variants]
        layers = sorted({layer for *_, policy in live for layer in policy.hidden_layers})
        try:
            if reads:
                self._stats.small_model_reads += 1
                self.small_model.read(reads, hidden_layers=layers)
        except Exception as exc:  # noqa: BLE001 - every row that needed it learns why
            log.exception("small-model forward failed")
            for i, row, _, _ in live:
                answers[i] = self._error(row, exc)
            live = []
        for policy, group in _by_policy(live).items():
            rows = [(i, row, state) for i, row, state, _ in group]
            for i, _, actions in self._decide(policy, rows):
                answers[i] = actions
        if self.config.read_ahead and self.small_model.reads_in_background:
            try:
                self._read_ahead([(row, state, policy, answers[i])
                                  for i, row, state, policy in live])  # fmt: skip
            except Exception:  # noqa: BLE001 - only a guess: the next step reads for real
                log.exception("small-model read-ahead failed")
        return [a for a in answers if a is not None]

    def _read_ahead(self, rows: list[tuple[RowEvents, RequestState, Policy, RowActions]]) -> None:
        """Guess each row's next token (the greedy pick from the logits it was answered on) and
        queue the small model's read of it in the background; the next step confirms the
        guess (its output is then ready) or re-reads from the true token."""
        guesses = []
        for row, state, policy, answer in rows:
            event = row.events[-1] if row.events else None
            if (
                policy.variants
                and answer.error is None
                and isinstance(event, ForwardPass)
                and event.logits is not None
                and event.step == state.next_step
            ):
                guesses.append((state, policy, greedy_guess(event, answer.actions)))
        if not guesses:
            return
        tokens = torch.stack([guess for *_, guess in guesses]).tolist()  # one sync for all
        reads, layers = [], set()
        for (state, policy, _), token in zip(guesses, tokens, strict=True):
            state.scratch["guess"] = (state.next_step, token)
            state.set_generated(state.next_step, [token])
            reads += [(state, variant) for variant in policy.variants]
            layers.update(policy.hidden_layers)
        try:
            self.small_model.read(reads, hidden_layers=sorted(layers), background=True)
        except Exception:  # noqa: BLE001 - only a guess: the next step reads for real
            log.exception("small-model read-ahead failed")

    def _prepare(self, row: RowEvents) -> RowActions | tuple[RequestState, Policy]:
        """Bring the request's state up to date with the row, or answer it right away."""
        if row.policy is None:
            return RowActions(row.request_id)  # static vectors only: nothing to decide
        policy = self.policies.get(row.policy)
        if policy is None:
            raise ValueError(
                f"steering policy '{row.policy}' is not configured; configured: "
                f"{', '.join(self.policies) or 'none'}"
            )
        state = self.states.get(row.request_id)
        if state is not None:
            self.states.move_to_end(row.request_id)
        if row.token_ids is not None:
            if state is None or state.policy != row.policy:
                state = self._new_state(row, policy)
            state.sync(row.token_ids, row.num_prompt_tokens)
        elif state is None:
            if not (row.events and isinstance(row.events[0], Prefilled)):
                self._stats.resyncs += 1
                return RowActions(row.request_id, resync=True)
            state = self._new_state(row, policy)
        guess = state.scratch.pop("guess", None)
        try:
            _apply_token_events(state, row.events)
        except LookupError:
            self._forget(row.request_id)
            self._stats.resyncs += 1
            return RowActions(row.request_id, resync=True)
        self._check_length(state)
        if guess is not None and guess[0] < state.next_step:
            hit = state.generated[guess[0]] == guess[1]
            self._stats.read_ahead_hits += hit
            self._stats.read_ahead_misses += not hit
        return state, policy

    def _check_length(self, state: RequestState) -> None:
        """Refuse (on this row only) a sequence longer than the small model reads."""
        limit = self.small_model.max_len
        if limit is not None and state.num_tokens > limit:
            raise ValueError(
                f"request {state.request_id} has {state.num_tokens} tokens; the small model "
                f"reads at most {limit} (steering.max_model_len)"
            )

    def _new_state(self, row: RowEvents, policy: Policy) -> RequestState:
        state = RequestState(
            row.request_id,
            row.policy,
            params=policy.params_for(row.params),
            max_backtrack=int(row.params.get("max_backtrack", 0)),
        )
        self.states[row.request_id] = state
        while len(self.states) > self.config.max_live_requests:
            self._forget(next(iter(self.states)))  # never released: resyncs if seen again
        return state

    def _decide(
        self, policy: Policy, rows: list[tuple[int, RowEvents, RequestState]]
    ) -> list[tuple[int, RowEvents, RowActions]]:
        """One `policy.decide` for the step's rows of that policy, each action checked against
        its row's events. If the call raises, each row is decided alone, so a row the policy
        fails on is reported (on that row only) and the others get their actions."""
        if len(rows) > 1 and type(policy).decide is Policy.decide:  # row by row anyway:
            return [answer for row in rows for answer in self._decide(policy, [row])]  # alone
        try:
            decided = policy.decide([(state, row.events) for _, row, state in rows])
            if len(decided) != len(rows):
                raise ValueError(
                    f"policy '{policy.name}' answered {len(decided)} of {len(rows)} rows"
                )
        except Exception as exc:  # noqa: BLE001 - reported on the rows
            if len(rows) > 1:
                return [answer for row in rows for answer in self._decide(policy, [row])]
            return [(i, row, self._error(row, exc)) for i, row, _ in rows]
        out = []
        for (i, row, _), actions in zip(rows, decided, strict=True):
            try:
                for action in actions:
                    check_legal_after(row.events, action)
                out.append((i, row, RowActions(row.request_id, actions)))
            except Exception as exc:  # noqa: BLE001 - reported on the row
                out.append((i, row, self._error(row, exc)))
        return out

    def _error(self, row: RowEvents, exc: Exception) -> RowActions:
        self._stats.errors += 1
        return RowActions(row.request_id, error=f"{type(exc).__name__}: {exc}")


def _by_policy(live: list[tuple]) -> dict[Policy, list[tuple]]:
    """Rows (index, row, state, policy) grouped by their policy, in first-seen order."""
    groups: dict[Policy, list[tuple]] = {}
    for item in live:
        groups.setdefault(item[3], []).append(item)
    return groups


def greedy_guess(event: ForwardPass, actions: list[Action]) -> torch.Tensor:
    """The token greedy decoding picks from `event.logits` once this step's AdjustedLogits is
    applied the way the engine applies it (the last one for the step wins there too; a 0-d
    tensor; a guess: sampling may differ)."""
    from models.engine.steering_hooks import apply_adjustments

    mine = [a for a in actions if isinstance(a, AdjustedLogits) and a.step == event.step]
    return apply_adjustments(event.logits[None], mine[-1:] or [None])[0].argmax()


def _apply_token_events(state: RequestState, events: list) -> None:
    """Update the request's tokens from Prefilled / Sampled / Added; a ForwardPass for a step
    whose earlier tokens were never reported raises LookupError (the engine must resync)."""
    for event in events:
        if isinstance(event, Prefilled):
            state.reset(event.prompt_ids, [])
        elif isinstance(event, Sampled):
            state.set_generated(event.step, [event.token_id])
        elif isinstance(event, Added):
            state.set_generated(event.step, event.token_ids)
        elif isinstance(event, ForwardPass):
            # the engine is about to sample token `step`: exactly `step` tokens exist (fewer
            # than we know after a backtrack, which the engine reports no other way)
            if event.step > state.next_step:
                raise LookupError(f"request {state.request_id}: step {event.step} arrived early")
            state.set_generated(event.step, [])
    if not state.tokens:
        raise LookupError(f"request {state.request_id}: no tokens known")


def _adapters_to_load(
    config: SteeringConfig, known: dict[str, str]
) -> tuple[str | None, dict[str, str]]:
    """The expert's variant name and the small-model adapters the policies use (name -> dir):
    steering.expert_adapter and any policy's params.expert, each a known adapter or a path."""
    wanted = [config.expert_adapter] + [p.params.get("expert") for p in config.policies]
    adapters: dict[str, str] = {}
    names = []
    for name in [w for w in wanted if w]:
        if name in known:
            adapters[name] = known[name]
        elif Path(name).is_dir():
            adapters[variant_name(name)] = name
        else:
            raise ValueError(
                f"small-model adapter '{name}' is neither a known adapter "
                f"({', '.join(known) or 'none'}) nor a directory"
            )
        names.append(variant_name(name))
    expert = names[0] if config.expert_adapter else None
    return expert, adapters


ENGINE_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")  # what the torch engine loads


def small_model_source(config: SteeringConfig, model_source: str) -> tuple[str | None, dict]:
    """The small model's checkpoint and its LoRA adapters by name: steering.small_model_source,
    else the small model of a builtin `model.source` (None: there is none)."""
    from models.builtin import resolve_source

    if config.small_model_source:
        own = resolve_source(config.small_model_source)
        return own.big, own.adapters
    paths = resolve_source(model_source)
    return paths.small, paths.small_adapters


def load_small_model(
    config: SteeringConfig, path: str, adapters: dict[str, str], max_model_len: int | None = None
) -> SmallModel:
    """The small model on the engine's paged runner when it can load it, else transformers."""
    runner = config.small_model_runner
    if runner == "auto":
        model_type = json.loads((Path(path) / "config.json").read_text()).get("model_type")
        runner = "engine" if model_type in ENGINE_MODEL_TYPES else "transformers"
    if runner == "engine":
        from models.steering.paged_small_model import PagedSmallModel

        return PagedSmallModel(
            path,
            adapters,
            config.device,
            config.dtype,
            kv_cache_gib=config.kv_cache_gib,
            max_model_len=max_model_len,
        )
    from models.steering.transformers_small_model import TransformersSmallModel

    return TransformersSmallModel(path, adapters, device=config.device, dtype=config.dtype)


def _vocab_size(big_model_path: str | None, small_model: SmallModel | None) -> int:
    if big_model_path:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(big_model_path).vocab_size
    return small_model.vocab_size if small_model is not None else 0


def _tokenizer(path: str | None) -> Any:
    if not path:
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def default_vector_dir(big_model_path: str) -> str:
    """$TANDEM_CACHE/vectors/<hash of the big model's path>: one library per big model."""
    root = os.environ.get("TANDEM_CACHE") or os.path.expanduser("~/.cache/tandem/models")
    key = hashlib.sha256(str(Path(big_model_path).resolve()).encode()).hexdigest()[:12]
    return str(Path(root) / "vectors" / key)
