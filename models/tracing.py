"""Request ids and per-token traces, free of Ray: the config block, the request's context, and
the Generator replica's bounded book of traces.

A traced request (`tandem: {trace: true}` in its body, or `telemetry.trace_all`) carries its
API request id as `GenerationRequest.trace_id`. The Generator records, per generated token:
the token and the text that step released, the steering call that concerned it (the events
sent, the actions answered, the policy and the call's latency) and the interventions the
response reports. A finished trace is kept `trace_ttl_s` seconds (at most `max_traces` of them)
and, when `trace_dir` is set, appended to `<trace_dir>/traces.jsonl`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections import OrderedDict
from contextvars import ContextVar
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from models.protocol.outputs import RequestOutput
from models.protocol.requests import GenerationRequest
from models.protocol.steering import RowActions, RowEvents

# (request id, arrival time on time.perf_counter()) of the HTTP request being served; the
# Ingress sets it, the serving layer reads the id (None in-process: the response id is used)
REQUEST: ContextVar[tuple[str, float] | None] = ContextVar("tandem_request", default=None)


def current_request_id() -> str | None:
    ctx = REQUEST.get()
    return ctx[0] if ctx else None


class TelemetryConfig(BaseModel):
    """Per-token traces (metrics need no settings: they are always on, and cheap)."""

    model_config = ConfigDict(extra="forbid")

    trace_all: bool = Field(
        False, description="Trace every request (else only those with `tandem: {trace: true}`)."
    )
    trace_ttl_s: float = Field(
        600, gt=0, description="How long a finished trace stays at GET /v1/traces/{request_id}."
    )
    trace_max_steps: int = Field(
        2048, ge=1, description="Tokens recorded per choice; later ones are counted, not kept."
    )
    max_traces: int = Field(1000, ge=1, description="Finished traces kept per Generator replica.")
    trace_dir: str | None = Field(
        None, description="Directory where finished traces are appended as JSON lines "
        "(traces.jsonl); unset: kept in memory only.",
    )  # fmt: skip


def _brief(obj: Any) -> dict[str, Any]:
    """A steering event or action as JSON: its type and its small fields (tensors left out)."""
    out: dict[str, Any] = {"type": type(obj).__name__}
    if dataclasses.is_dataclass(obj):
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if isinstance(value, bool | int | float | str) or value is None:
                out[f.name] = value
            elif isinstance(value, list | tuple) and len(value) <= 64:
                if all(isinstance(v, int | float | str) for v in value):
                    out[f.name] = list(value)
                else:
                    out[f.name] = f"<{len(value)} items>"
    return out


class _Choice:
    """One engine request's trace (one choice of an API request)."""

    def __init__(self, request: GenerationRequest, max_steps: int):
        self.engine_request_id = request.request_id
        steering = request.steering
        self.policy = steering.policy if steering else None
        self.mode = steering.mode if steering else None
        self.started = time.perf_counter()
        self.steps: dict[int, dict[str, Any]] = {}
        self.interventions: list[dict[str, Any]] = []
        self.max_steps = max_steps
        self.dropped = 0
        self.finish_reason: str | None = None
        self.finished = False

    def step(self, index: int, token: bool = False) -> dict[str, Any] | None:
        """The entry of generated-token `index`; None past max_steps (a token's is counted)."""
        entry = self.steps.get(index)
        if entry is None:
            if len(self.steps) >= self.max_steps:
                self.dropped += token
                return None
            entry = self.steps[index] = {"step": index}
        return entry

    def to_dict(self) -> dict[str, Any]:
        return {
            "engine_request_id": self.engine_request_id, "policy": self.policy,
            "mode": self.mode, "finished": self.finished, "finish_reason": self.finish_reason,
            "steps": [self.steps[k] for k in sorted(self.steps)],
            "interventions": self.interventions, "steps_dropped": self.dropped,
        }  # fmt: skip


class TraceBook:
    """The traces of one Generator replica: live ones by engine request id, finished ones by
    API request id for `trace_ttl_s`. Every method is called on the replica's event loop."""

    def __init__(self, config: TelemetryConfig | None = None):
        self.config = config or TelemetryConfig()
        self.live: dict[str, tuple[str, int, _Choice]] = {}  # engine id -> (trace id, index, c)
        self.traces: OrderedDict[str, dict[str, Any]] = OrderedDict()  # trace id -> trace

    def start(self, request: GenerationRequest) -> bool:
        """Begin the request's trace if it asked for one; True when it is traced."""
        trace_id = request.trace_id
        if trace_id is None:
            return False
        self._expire()
        trace = self.traces.get(trace_id)
        if trace is None:
            trace = self.traces[trace_id] = {"request_id": trace_id, "created": time.time(),
                                             "choices": {}, "done_at": None}  # fmt: skip
        trace["done_at"] = None  # live again (an id a client sent twice, or the next choice)
        index = _choice_index(request.request_id)
        choice = trace["choices"][index] = _Choice(request, self.config.trace_max_steps)
        self.live[request.request_id] = (trace_id, index, choice)
        return True

    def on_output(self, out: RequestOutput) -> None:
        """One engine output of a traced request: its tokens, text and interventions."""
        entry = self.live.get(out.request_id)
        if entry is None:
            return
        choice = entry[2]
        t_ms = round((time.perf_counter() - choice.started) * 1e3, 3)
        first = out.num_generated_tokens - len(out.token_ids)
        for i, token in enumerate(out.token_ids):
            step = choice.step(first + i, token=True)
            if step is not None:
                if "token_id" in step:  # the step was taken back (backtrack) and made again
                    step.setdefault("replaced", []).append(step["token_id"])
                step["token_id"], step["t_ms"] = token, t_ms
        if out.text and (step := choice.step(max(out.num_generated_tokens - 1, 0))) is not None:
            step["text"] = step.get("text", "") + out.text
        for iv in out.interventions:
            item = {"step": iv.step, "action": iv.action, **({"detail": iv.detail} if iv.detail else {})}
            choice.interventions.append(item)
            if (step := choice.step(iv.step)) is not None:
                step.setdefault("interventions", []).append(item)
        if out.finished:
            self._finish(out.request_id, out.finish_reason)

    def on_call(self, rows: list[RowEvents], answers: list[RowActions], latency_s: float) -> None:
        """One steering call: what each traced row sent and got back, and how long it took."""
        if not self.live:
            return
        by_id = {a.request_id: a for a in answers}
        for row in rows:
            entry = self.live.get(row.request_id)
            if entry is None:
                continue
            passes = [e.step for e in row.events if type(e).__name__ == "ForwardPass"]
            step = entry[2].step(passes[-1] if passes else 0)
            if step is None:
                continue
            answer = by_id.get(row.request_id)
            call = {"policy": row.policy, "latency_ms": round(latency_s * 1e3, 3),
                    "events": [_brief(e) for e in row.events],
                    "actions": [_brief(a) for a in answer.actions] if answer else []}  # fmt: skip
            if answer is not None and (answer.error or answer.resync):
                call.update(error=answer.error, resync=answer.resync)
            step.setdefault("calls", []).append(call)

    def close(self, request_id: str) -> None:
        """The request's stream ended (finished, aborted or failed)."""
        if request_id in self.live:
            self._finish(request_id, None)

    def get(self, trace_id: str) -> dict[str, Any] | None:
        """The trace as JSON (its choices in order), or None when unknown or expired."""
        self._expire()
        trace = self.traces.get(trace_id)
        if trace is None:
            return None
        choices = [{"index": i, **c.to_dict()} for i, c in sorted(trace["choices"].items())]
        return {"object": "tandem.trace", "request_id": trace_id, "created": trace["created"],
                "choices": choices}  # fmt: skip

    def _finish(self, request_id: str, reason: str | None) -> None:
        trace_id, _, choice = self.live.pop(request_id)
        choice.finished, choice.finish_reason = True, reason or choice.finish_reason
        trace = self.traces.get(trace_id)
        if trace is None or not all(c.finished for c in trace["choices"].values()):
            return
        trace["done_at"] = time.monotonic()
        self.traces.move_to_end(trace_id)
        if self.config.trace_dir:
            self._append(self.get(trace_id))

    def _append(self, trace: dict[str, Any] | None) -> None:
        os.makedirs(self.config.trace_dir, exist_ok=True)
        with open(os.path.join(self.config.trace_dir, "traces.jsonl"), "a") as f:
            f.write(json.dumps(trace) + "\n")

    def _expire(self) -> None:
        """Forget finished traces past their time, and the oldest beyond max_traces."""
        now, ttl = time.monotonic(), self.config.trace_ttl_s
        for trace_id, trace in list(self.traces.items()):
            done = trace["done_at"]
            too_many = len(self.traces) > self.config.max_traces
            if done is not None and (now - done > ttl or too_many):
                del self.traces[trace_id]


def _choice_index(engine_request_id: str) -> int:
    """The choice index the serving layer put at the end of an engine request id."""
    tail = engine_request_id.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else 0
