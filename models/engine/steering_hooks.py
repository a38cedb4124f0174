"""The engine side of steering: per-row state, the one observer call per step, and actions.

Once per engine step, every steered row that is due (every k generated tokens, and no call of
its own still in flight) contributes its events since its last call, ending with
ForwardPass(step) for the token about to be sampled, to ONE `observer.on_step(rows)` call.
`sync` and `colocated` rows wait for the answer before sampling (their ForwardPass carries
logits); when the step has other rows to sample, those never wait: the waiting rows are
*parked* (left out of the next forwards) and sampled at the first step after their answer
arrived or their timeout passed. `async` rows never wait: their actions are applied at the first step after they
arrive, and an AdjustedLogits for a token already sampled is dropped and reported as late.
A call that raises or passes timeout_s leaves its rows unsteered for the rest of the request
(policy vectors cleared, static steer_vectors kept), flagged by an Intervention
"steerer_error" / "steerer_timeout" ("steerer_unavailable" when the observer did not consult a
Steerer that kept failing). ForceOutput cannot take back text already streamed: when
`text` does not start with it, the client gets `text` whole after what it already has. An action the legality table forbids after every event
of its call finishes the row with finish_reason "error".
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import logging
import threading
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

import torch

from models.engine.device import stack_rows, to_device
from models.engine.hidden_capture import compact
from models.engine.output import finish
from models.engine.sequence import Sequence
from models.protocol.errors import EngineError
from models.protocol.outputs import Intervention
from models.protocol.steering import (
    AdjustedLogits,
    AdjustedPrefill,
    Backtrack,
    ClearSteer,
    EmitError,
    Event,
    ForceOutput,
    ForceTokens,
    ForwardPass,
    IllegalActionError,
    Noop,
    PrefetchRow,
    Prefilled,
    RowActions,
    RowEvents,
    SteeringRequest,
    SteerVector,
    StepObserver,
    check_legal_after,
)

log = logging.getLogger(__name__)


@dataclass
class RowSteering:
    """Steering state of one request inside the engine."""

    request: SteeringRequest
    enabled: bool = True
    events: list[Event] = field(default_factory=list)  # since the last call
    send_token_ids: bool = True  # first call, or the Steerer asked for a resync
    prefilled_reported: bool = False
    in_flight: bool = False
    pending_logits: dict[int, AdjustedLogits] = field(default_factory=dict)
    # tokens whose text is held back so a backtrack inside the window stays invisible
    held_tokens: int = field(init=False)

    def __post_init__(self) -> None:
        self.held_tokens = self.request.max_backtrack

    @property
    def waits(self) -> bool:
        return self.request.waits


@dataclass
class ObserverCall:
    future: concurrent.futures.Future
    rows: dict[str, tuple[Sequence, list[Event]]]
    deadline: float
    started_step: int


class CoroutineRunner:
    """Runs observer coroutines on an event loop: the caller's (TorchEngine sets it) or a
    private one in a daemon thread (a bare LLMEngine)."""

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None

    def submit(self, coro: Coroutine) -> concurrent.futures.Future:
        if self.loop is None:
            self.loop = asyncio.new_event_loop()
            threading.Thread(target=self.loop.run_forever, daemon=True).start()
        return asyncio.run_coroutine_threadsafe(coro, self.loop)


class SteeringHooks:
    """Collects events, makes the per-step observer call, and applies actions to rows."""

    def __init__(self, editor: SequenceEditor):
        self.editor = editor
        self.observer: StepObserver | None = None
        self.runner = CoroutineRunner()
        self.in_flight: list[ObserverCall] = []
        self.num_calls = 0
        # sync rows waiting for their call while the step's other rows went on: id -> (seq,
        # the logits their token is sampled from once the answer is applied)
        self.parked: dict[str, tuple[Sequence, torch.Tensor]] = {}

    def record(self, seq: Sequence, event: Event) -> None:
        if seq.steering is not None and seq.steering.enabled:
            seq.steering.events.append(event)

    def poll(self) -> None:
        """Apply the answers of async calls that arrived; time out the overdue ones."""
        still = []
        for call in self.in_flight:
            if call.future.done():
                self._finish_call(call)
            elif time.monotonic() > call.deadline:
                call.future.cancel()
                self._fail_call(call, "steerer_timeout", "the steerer did not answer in time")
            else:
                still.append(call)
        self.in_flight = still

    def consult(self, rows: list[tuple[Sequence, torch.Tensor]], step_index: int) -> None:
        """Make this step's observer call for the due rows among `rows` (seq, logits), wait
        for it when a sync row is in it, and apply what came back."""
        due = [(s, lg) for s, lg in rows if self._due(s)]
        if not due or self.observer is None:
            return
        call_rows: dict[str, tuple[Sequence, list[Event]]] = {}
        batch = []
        hidden = self._hidden_for(due)
        for seq, logits in due:
            st: RowSteering = seq.steering
            if not st.prefilled_reported and seq.num_generated == 0:
                prompt = seq.token_ids[: seq.num_prompt_tokens]
                st.events.append(Prefilled(prompt, hidden=hidden.get((seq.request_id, True))))
                st.prefilled_reported = True
                seq.prompt_hidden = None
            st.events.append(
                ForwardPass(
                    step=seq.num_generated,
                    logits=logits.float() if st.waits else None,
                    hidden=hidden.get((seq.request_id, False)),
                )
            )
            batch.append(
                RowEvents(
                    request_id=seq.request_id,
                    events=st.events,
                    policy=st.request.policy,
                    params=st.request.params,
                    num_prompt_tokens=seq.num_prompt_tokens,
                    token_ids=list(seq.token_ids) if st.send_token_ids else None,
                    mode=st.request.mode,
                )
            )
            call_rows[seq.request_id] = (seq, st.events)
            st.events, st.send_token_ids, st.in_flight = [], False, True
        timeout = max(s.steering.request.timeout_s for s, _ in due)
        call = ObserverCall(self._submit(batch), call_rows, time.monotonic() + timeout, step_index)
        self.num_calls += 1
        waiting = [(s, lg) for s, lg in due if s.steering.waits]
        if waiting and len(waiting) < len(rows) and not call.future.done():
            # rows that do not wait for this call are in the step: they get their tokens
            # now, and the waiting rows sit out until the answer (or their timeout) comes
            self.parked.update((s.request_id, (s, lg)) for s, lg in waiting)
            self.in_flight.append(call)
        elif waiting:
            try:
                call.future.result(timeout=timeout)
            except concurrent.futures.TimeoutError:
                call.future.cancel()
                self._fail_call(call, "steerer_timeout", f"no answer within {timeout} s")
                return
            except Exception:  # reported by _finish_call
                pass
            self._finish_call(call)
        else:
            self.in_flight.append(call)

    def is_parked(self, seq: Sequence) -> bool:
        return seq.request_id in self.parked

    def take_unparked(self) -> list[tuple[Sequence, torch.Tensor]]:
        """Parked rows whose call was answered, failed or timed out (see `poll`), with the
        logits they wait to sample from; finished ones are dropped."""
        out = []
        for request_id, (seq, logits) in list(self.parked.items()):
            if seq.is_finished or not seq.steering.in_flight:
                del self.parked[request_id]
                if not seq.is_finished and seq.num_uncomputed == 0:
                    out.append((seq, logits))
        return out

    def wait_parked(self) -> None:
        """Nothing else to run: wait for the first call a parked row waits on, until the
        earliest deadline among them (`poll` then applies or times it out)."""
        calls = [c for c in self.in_flight if any(r in self.parked for r in c.rows)]
        if calls:
            timeout = max(0.0, min(c.deadline for c in calls) - time.monotonic())
            concurrent.futures.wait([c.future for c in calls], timeout,
                                    concurrent.futures.FIRST_COMPLETED)  # fmt: skip

    @staticmethod
    def _hidden_for(due: list[tuple[Sequence, torch.Tensor]]) -> dict[tuple[str, bool], torch.Tensor]:
        """(request id, prompt?) -> the due rows' ForwardPass.hidden (False) and Prefilled.hidden
        (True), for rows whose policy reads the big model's state: the device tensors for
        colocated rows, compact host copies (one copy for all rows) for rows the Steerer answers
        in another process."""
        out, remote = {}, []
        for seq, _ in due:
            if seq.hidden is None:  # the usual row: one attribute read
                continue
            layers = seq.steering.request.hidden_layers
            if not layers:
                continue
            pick = None
            if list(seq.hidden_layers) != layers:  # the request asked for more layers
                pick = [seq.hidden_layers.index(x) for x in layers]
            parts = [((seq.request_id, False), seq.hidden if pick is None else seq.hidden[pick])]
            if seq.prompt_hidden is not None and not seq.steering.prefilled_reported:
                prompt = seq.prompt_hidden if pick is None else seq.prompt_hidden[:, pick]
                parts.append(((seq.request_id, True), prompt))
            if seq.steering.request.mode == "colocated":
                out.update(parts)
            else:
                remote += parts
        if remote:
            host = compact([h for _, h in remote], remote[0][1].dtype)
            out.update((key, h) for (key, _), h in zip(remote, host, strict=True))
        return out

    def prefetch(self, seqs: list[Sequence]) -> None:
        """Give the observer's `prefetch(rows)` (a colocated steering runtime reads there) the
        due rows' tokens right after the step's forward was queued and before `consult` builds the call: the
        small model's read of the same tokens can then run on the GPU beside the big model's
        forward instead of after it. Only a head start: `consult` still makes the step's one
        call, and a prefetch that fails changes nothing."""
        if self.observer is None:
            return
        due = self._due
        rows = [
            PrefetchRow(s.request_id, s.token_ids, s.num_prompt_tokens, s.steering.request.mode)
            for s in seqs
            if due(s)
        ]
        if rows:
            try:
                self.observer.prefetch(rows)
            except Exception:  # noqa: BLE001 - the step's call reads (and reports) anyway
                log.exception("steering prefetch failed")

    def take_adjustment(self, seq: Sequence) -> AdjustedLogits | None:
        """The AdjustedLogits waiting for the token about to be sampled, if any (those for
        tokens already sampled are dropped as late)."""
        st: RowSteering | None = seq.steering
        if st is None or not st.pending_logits:
            return None
        for step in [s for s in st.pending_logits if s < seq.num_generated]:
            self._late(seq, st.pending_logits.pop(step))
        return st.pending_logits.pop(seq.num_generated, None)

    def _due(self, seq: Sequence) -> bool:
        st: RowSteering | None = seq.steering
        return (
            st is not None
            and st.enabled
            and not st.in_flight
            and not seq.is_finished
            and seq.num_generated % st.request.every == 0
        )

    def _submit(self, batch: list[RowEvents]) -> concurrent.futures.Future:
        try:
            result = self.observer.on_step(batch)
        except Exception as exc:
            future: concurrent.futures.Future = concurrent.futures.Future()
            future.set_exception(exc)
            return future
        if inspect.isawaitable(result):
            return self.runner.submit(_awaited(result))
        future = concurrent.futures.Future()
        future.set_result(result)
        return future

    def _finish_call(self, call: ObserverCall) -> None:
        exc = call.future.exception() if not call.future.cancelled() else None
        if call.future.cancelled() or exc is not None:
            self._fail_call(call, "steerer_error", f"the steerer failed: {exc!r}")
            return
        try:
            answered = {a.request_id: a for a in call.future.result() or []}
        except Exception as exc:  # noqa: BLE001 - an answer that is not RowActions
            self._fail_call(call, "steerer_error", f"the steerer answered nonsense: {exc!r}")
            return
        for request_id, (seq, events) in call.rows.items():
            seq.steering.in_flight = False
            row_actions = answered.get(request_id)
            if row_actions is None or seq.is_finished:
                continue
            self._apply_row(seq, events, row_actions)

    def _fail_call(self, call: ObserverCall, kind: str, message: str) -> None:
        for seq, _ in call.rows.values():
            self._unsteer(seq, kind, message)

    def _unsteer(self, seq: Sequence, kind: str, message: str) -> None:
        st: RowSteering = seq.steering
        st.enabled, st.in_flight = False, False
        st.pending_logits.clear()
        self.editor.reset_vectors(seq)
        seq.interventions.append(Intervention(seq.num_generated, kind, {"message": message}))

    def _apply_row(self, seq: Sequence, events: list[Event], row_actions: RowActions) -> None:
        if row_actions.resync:
            seq.steering.send_token_ids = True
        if row_actions.error:
            kind = "steerer_unavailable" if row_actions.unavailable else "steerer_error"
            self._unsteer(seq, kind, row_actions.error)
            return
        for action in row_actions.actions:
            if seq.is_finished:
                return
            try:
                check_legal_after(events, action)
                self._apply(seq, action)
            except (IllegalActionError, EngineError) as exc:
                finish(seq, "error", f"steering: {exc}")
                return
            except Exception as exc:  # noqa: BLE001 - applying it broke: this row fails alone
                log.warning("request %s: applying %r failed", seq.request_id, action,
                            exc_info=True)  # fmt: skip
                finish(seq, "error", f"steering: applying {type(action).__name__} failed: {exc!r}")
                return

    def _apply(self, seq: Sequence, action: Any) -> None:
        if isinstance(action, Noop):
            return
        step = seq.num_generated
        detail: dict[str, Any] = {}
        if isinstance(action, AdjustedLogits):
            self.editor.check_logits(action)
            if action.step < step:
                return self._late(seq, action)
            seq.steering.pending_logits[action.step] = action
            detail = {"for_step": action.step}
        elif isinstance(action, AdjustedPrefill):
            self.editor.replace_prompt(seq, action.token_ids)
            detail = {"num_tokens": len(action.token_ids)}
        elif isinstance(action, SteerVector):
            self.editor.set_vector(seq, action.name, action.coeff, action.layers)
            detail = {"name": action.name, "coeff": action.coeff, "layers": action.layers}
        elif isinstance(action, ClearSteer):
            self.editor.clear_vector(seq, action.name)
            detail = {"name": action.name}
        elif isinstance(action, ForceTokens):
            self.editor.force_tokens(seq, action.token_ids)
            detail = {"token_ids": list(action.token_ids)}
        elif isinstance(action, Backtrack):
            self.editor.backtrack(seq, action.n)
            if action.token_ids:
                self.editor.force_tokens(seq, action.token_ids)
            detail = {"n": action.n, "token_ids": list(action.token_ids)}
        elif isinstance(action, ForceOutput):
            self.editor.force_output(seq, action.text)
        elif isinstance(action, EmitError):
            finish(seq, "error", action.message)
            detail = {"message": action.message}
        seq.interventions.append(Intervention(step, type(action).__name__, detail))

    def _late(self, seq: Sequence, action: AdjustedLogits) -> None:
        seq.interventions.append(
            Intervention(
                seq.num_generated,
                "AdjustedLogits",
                {"dropped": "late", "for_step": action.step},
            )
        )


def apply_adjustments(logits: torch.Tensor, actions: list[AdjustedLogits | None]) -> torch.Tensor:
    """logits [rows, vocab] with each row's AdjustedLogits applied (None: that row unchanged).

    Per row: the replacement logits (or the row's own) plus the delta, then the plausibility
    head, which keeps the tokens whose probability under the row's own logits is at least alpha
    times the top one's. Batched: the deltas of all rows are added in one operation and the
    head is one softmax, so the cost does not grow with the number of steered rows."""
    if not any(a is not None for a in actions):
        return logits
    out = logits
    replaced = [
        (i, a.logits) for i, a in enumerate(actions) if a is not None and a.logits is not None
    ]
    if replaced:
        out = out.clone()
        for i, row_logits in replaced:
            out[i] = row_logits.to(out)
    deltas = [(i, a.delta) for i, a in enumerate(actions) if a is not None and a.delta is not None]
    if deltas:
        rows = _row_index([i for i, _ in deltas], len(actions), out.device)
        stacked = stack_rows([d for _, d in deltas]).to(out)  # views of one policy delta
        out = out + stacked if rows is None else out.index_add(0, rows, stacked)
    heads = [(i, a.plausibility_alpha) for i, a in enumerate(actions)
             if a is not None and a.plausibility_alpha is not None]  # fmt: skip
    if heads:
        rows = _row_index([i for i, _ in heads], len(actions), out.device)
        probs = (logits if rows is None else logits[rows]).float().softmax(-1)
        alpha = to_device([a for _, a in heads], probs.dtype, probs.device)[:, None]
        implausible = probs < alpha * probs.amax(-1, keepdim=True)
        if rows is None:
            out = out.masked_fill(implausible, float("-inf"))
        else:
            out = out.index_put((rows,), out[rows].masked_fill(implausible, float("-inf")))
    return out


def _row_index(rows: list[int], num_rows: int, device: torch.device) -> torch.Tensor | None:
    """None when `rows` are all rows in order (whole-tensor ops need no index), else the
    indices on `device`."""
    if rows == list(range(num_rows)):
        return None
    return to_device(rows, torch.int64, device)


async def _awaited(awaitable: Any) -> Any:
    return await awaitable


class SequenceEditor:
    """What actions may do to a sequence; implemented by the engine (tokens, blocks, vectors)."""

    def replace_prompt(self, seq: Sequence, token_ids: list[int]) -> None: ...
    def force_tokens(self, seq: Sequence, token_ids: list[int]) -> None: ...
    def backtrack(self, seq: Sequence, n: int) -> None: ...
    def force_output(self, seq: Sequence, text: str) -> None: ...
    def set_vector(self, seq: Sequence, name: str, coeff: float, layers: list[int] | None): ...
    def clear_vector(self, seq: Sequence, name: str | None) -> None: ...
    def reset_vectors(self, seq: Sequence) -> None: ...
    def check_logits(self, action: AdjustedLogits) -> None: ...
