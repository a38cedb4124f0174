"""Tandem's metrics, through Ray's metrics API: on Ray's Prometheus endpoint (as `ray_<name>`,
with the replica's deployment, replica and application tags) and in the Ray dashboard.

Every family is defined once here (`families()` lists them, for the docs and the tests); the
deployments call one-line recorders. A record costs about 5 microseconds of CPU, so nothing
records per token: the Ingress records once per streamed chunk (at most one per
server.stream_interval_s per request), the Generator once per request and per engine step.

requests  (Ingress)   tandem_request_ttft_seconds, _inter_token_seconds, _e2e_seconds,
                      _serve_seconds (e2e minus the engine's part), tandem_requests_total,
                      tandem_prompt_tokens_total, tandem_generation_tokens_total
                      (all by model and adapter); tandem_request_errors_total{status, type, code}
engine    (Generator) tandem_request_engine_seconds,
                      tandem_engine_{running,waiting,kv_blocks_used,kv_blocks_total},
                      tandem_engine_step_seconds, tandem_engine_preemptions_total,
                      tandem_engine_failures_total{kind}
steering  (Generator) tandem_steering_calls_total{where}, tandem_steering_call_seconds{where},
                      tandem_steering_interventions_total{action, policy},
                      tandem_steering_timeouts_total, tandem_steering_late_total,
                      tandem_steering_failures_total (by policy)
router    (Router)    tandem_router_decisions_total{adapter}, tandem_router_confidence,
                      tandem_router_seconds
retrieval (Retriever) tandem_retrieval_search_seconds, tandem_retrieval_hits_total,
                      tandem_retrieval_chunks_ingested_total, tandem_retrieval_upload_bytes_total
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from models.protocol.outputs import RequestOutput
from models.protocol.requests import GenerationRequest
from models.protocol.steering import RowActions, RowEvents, StepObserver
from models.tracing import REQUEST, TraceBook

logger = logging.getLogger("ray.serve")

# 1 ms resolution up to 20 ms (a GPU's decode step and inter-token time), then coarser
LATENCY_BUCKETS = [i / 1000 for i in range(1, 21)] + [
    0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 20,
    30, 60, 120, 300]  # fmt: skip
CONFIDENCE_BUCKETS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0]
BY_MODEL = ("model", "adapter")

# name: (kind, description, tag keys); histograms use LATENCY_BUCKETS unless named below
FAMILIES: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "tandem_request_ttft_seconds": ("histogram", "Time to first token: HTTP arrival at the "
                                    "Ingress to the first generated token there.", BY_MODEL),
    "tandem_request_e2e_seconds": ("histogram", "HTTP arrival to the last token.", BY_MODEL),
    "tandem_request_serve_seconds": ("histogram", "Per request, the part of e2e spent outside "
                                     "the engine (HTTP, Ingress, routing, retrieval, Ray "
                                     "hops): e2e minus tandem_request_engine_seconds.", BY_MODEL),
    "tandem_requests_total": ("counter", "Choices finished, by finish reason.",
                              BY_MODEL + ("finish_reason",)),
    "tandem_prompt_tokens_total": ("counter", "Prompt tokens of finished choices.", BY_MODEL),
    "tandem_generation_tokens_total": ("counter", "Tokens generated.", BY_MODEL),
    "tandem_request_errors_total": ("counter", "Requests answered with an error, by HTTP "
                                    "status, OpenAI error type and code.",
                                    ("status", "type", "code")),
    "tandem_request_inter_token_seconds": ("histogram", "Time between two streamed chunks of a "
                                           "request at the Ingress, per token they carry.",
                                           BY_MODEL),
    "tandem_request_engine_seconds": ("histogram", "Admission by the Generator to the last "
                                      "token (queueing in the engine included).", BY_MODEL),
    "tandem_engine_running": ("gauge", "Sequences in the running batch.", ()),
    "tandem_engine_waiting": ("gauge", "Requests waiting for KV-cache space or a slot.", ()),
    "tandem_engine_kv_blocks_used": ("gauge", "KV-cache blocks in use.", ()),
    "tandem_engine_kv_blocks_total": ("gauge", "KV-cache blocks of the replica.", ()),
    "tandem_engine_prefix_cache_hit_rate": ("gauge", "Share of admitted prompt tokens found in "
                                            "the prefix cache.", ()),
    "tandem_engine_step_seconds": ("histogram", "Engine step time (forward, sampling, "
                                   "steering, outputs).", ()),
    "tandem_engine_preemptions_total": ("counter", "Sequences preempted for KV space.", ()),
    "tandem_engine_failures_total": ("counter", "Failed engine steps (kind=step: their "
                                     "requests fail), rows failed alone (kind=row) and failed "
                                     "engines (kind=engine).", ("kind",)),
    "tandem_steering_calls_total": ("counter", "Steering calls, one per engine step with due "
                                    "steered rows (where=steerer|colocated).", ("where",)),
    "tandem_steering_call_seconds": ("histogram", "Steering call latency as the Generator "
                                     "sees it.", ("where",)),
    "tandem_steering_interventions_total": ("counter", "Steering actions applied.",
                                            ("action", "policy")),
    "tandem_steering_timeouts_total": ("counter", "Rows left unsteered because the Steerer "
                                       "passed steering.timeout_s.", ("policy",)),
    "tandem_steering_late_total": ("counter", "Logit adjustments dropped because their token "
                                   "was already sampled (async mode).", ("policy",)),
    "tandem_steering_failures_total": ("counter", "Rows left unsteered because the Steerer "
                                       "failed.", ("policy",)),
    "tandem_router_decisions_total": ("counter", "Prompts routed, by chosen adapter ('base' "
                                      "for the base model).", ("adapter",)),
    "tandem_router_confidence": ("histogram", "The router's confidence in its choice.", ()),
    "tandem_router_seconds": ("histogram", "Routing latency (batching wait included).", ()),
    "tandem_retrieval_search_seconds": ("histogram", "Retrieval search latency (embedding, "
                                        "FAISS, batching wait).", ()),
    "tandem_retrieval_hits_total": ("counter", "Chunks returned by searches.", ()),
    "tandem_retrieval_chunks_ingested_total": ("counter", "Chunks indexed from attached "
                                               "files.", ()),
    "tandem_retrieval_upload_bytes_total": ("counter", "Bytes of uploaded files.", ()),
}  # fmt: skip
BUCKETS = {"tandem_router_confidence": CONFIDENCE_BUCKETS}

_metrics: dict[str, Any] = {}
# TANDEM_METRICS=0 (in the environment of `serve run`) turns recording off: the recorders
# leave the request path as it was (bench/serve_path.py --compare-metrics measures the cost)
ENABLED = os.environ.get("TANDEM_METRICS", "1") != "0"


class _Off:
    def inc(self, *args: Any, **kw: Any) -> None: ...
    def observe(self, *args: Any, **kw: Any) -> None: ...
    def set(self, *args: Any, **kw: Any) -> None: ...


class _Safe:
    """A Ray metric whose records never raise into the request path (a bad value is logged)."""

    __slots__ = ("_m",)

    def __init__(self, m: Any):
        self._m = m

    def _call(self, op: str, value: float, tags: dict[str, str] | None) -> None:
        try:
            getattr(self._m, op)(value, tags)
        except Exception:  # noqa: BLE001 - metrics must not fail a request
            logger.warning("recording %s.%s(%r, %r) failed", self._m._name, op, value, tags,
                           exc_info=True)  # fmt: skip

    def inc(self, value: float = 1.0, tags: dict[str, str] | None = None) -> None:
        self._call("inc", value, tags)

    def observe(self, value: float, tags: dict[str, str] | None = None) -> None:
        self._call("observe", value, tags)

    def set(self, value: float, tags: dict[str, str] | None = None) -> None:
        self._call("set", value, tags)


def families() -> dict[str, str]:
    """Every family's name as Prometheus shows it (Ray prefixes `ray_`) -> its kind."""
    return {f"ray_{name}": kind for name, (kind, _, _) in FAMILIES.items()}


def metric(name: str) -> Any:
    """The process's metric object for a family, made on first use (Ray wants one per process)."""
    m = _metrics.get(name)
    if m is None and not ENABLED:
        m = _metrics[name] = _Off()
    if m is None:
        from ray.serve import metrics

        kind, description, tags = FAMILIES[name]
        if kind == "histogram":
            m = metrics.Histogram(name, description=description, tag_keys=tags,
                                  boundaries=BUCKETS.get(name, LATENCY_BUCKETS))  # fmt: skip
        else:
            m = (metrics.Counter if kind == "counter" else metrics.Gauge)(
                name, description=description, tag_keys=tags)
        m = _metrics[name] = _Safe(m)
    return m


# ---- requests (Ingress) -------------------------------------------------------------------


def begin_request(request_id: str | None) -> None:
    """Called first by an Ingress route: the request's id and arrival time for what follows."""
    REQUEST.set((request_id or "", time.perf_counter()))


def record_error(error: Any) -> None:
    """An OpenAIError answered to a client."""
    tags = {"status": str(error.status_code), "type": error.type, "code": error.code or "none"}
    metric("tandem_request_errors_total").inc(tags=tags)


def metered(generate: Callable[[GenerationRequest], AsyncIterator[RequestOutput]], model: str):
    """The Ingress's generate, recording TTFT, e2e, serve time, tokens and finishes."""
    if not ENABLED:
        return generate

    def wrapped(request: GenerationRequest) -> AsyncIterator[RequestOutput]:
        ctx = REQUEST.get()
        return _metered(generate(request), request, model, ctx[1] if ctx else time.perf_counter())

    return wrapped


def _tags(model: str, request: GenerationRequest) -> dict[str, str]:
    adapter = request.adapter or ("mix" if request.adapter_weights else "base")
    return {"model": model, "adapter": adapter}


async def _metered(outputs: AsyncIterator[RequestOutput], request: GenerationRequest,
                   model: str, arrived: float) -> AsyncIterator[RequestOutput]:  # fmt: skip
    tags, last = _tags(model, request), None
    async for out in outputs:
        if out.token_ids:
            now = time.perf_counter()
            if last is None:
                metric("tandem_request_ttft_seconds").observe(now - arrived, tags)
            else:  # one record per chunk (server.stream_interval_s), not per token: cheap
                gap = (now - last) / len(out.token_ids)
                metric("tandem_request_inter_token_seconds").observe(gap, tags)
            last = now
        if out.finished:
            e2e = time.perf_counter() - arrived
            metric("tandem_request_e2e_seconds").observe(e2e, tags)
            if out.engine_s is not None:
                metric("tandem_request_serve_seconds").observe(max(e2e - out.engine_s, 0), tags)
            for family, count in (("tandem_prompt_tokens_total", out.num_prompt_tokens),
                                  ("tandem_generation_tokens_total", out.num_generated_tokens)):
                if count > 0:  # a Ray counter refuses 0
                    metric(family).inc(count, tags)
            reason = {"finish_reason": out.finish_reason or "unknown"}
            metric("tandem_requests_total").inc(tags={**tags, **reason})
        yield out


# ---- engine and steering (Generator) --------------------------------------------------------


class RequestWatch:
    """One request's engine outputs, timed and counted as they pass (GeneratorTelemetry.watch)."""

    def __init__(self, telemetry: GeneratorTelemetry, request: GenerationRequest, traced: bool):
        self.traces = telemetry.traces if traced else None
        self.request_id = request.request_id
        self.tags = _tags(telemetry.model, request)
        self.policy = {"policy": request.steering.policy if request.steering else "static"}
        self.admitted = time.perf_counter()

    def __call__(self, out: RequestOutput) -> None:
        for iv in out.interventions:
            _count_intervention(iv.action, iv.detail, self.policy)
        if out.finished:
            out.engine_s = time.perf_counter() - self.admitted
            metric("tandem_request_engine_seconds").observe(out.engine_s, self.tags)
        if self.traces is not None:
            self.traces.on_output(out)

    def close(self) -> None:
        if self.traces is not None:
            self.traces.close(self.request_id)


class GeneratorTelemetry:
    """The Generator replica's recorders: each request's engine outputs (`watch`), the step
    observer (`observer`), the engine's counters (`export`) and the replica's traces."""

    def __init__(self, config: Any):  # a TandemConfig
        self.model = config.model.name
        self.traces = TraceBook(config.telemetry)

    def watch(self, request: GenerationRequest) -> RequestWatch | None:
        """A request's watch (time in the engine, interventions counted, its trace kept when
        it asked for one): call it with each engine output, close it once; None when there
        is nothing to record."""
        traced = self.traces.start(request)
        if not ENABLED and not traced:
            return None
        return RequestWatch(self, request, traced)

    def observer(self, inner: StepObserver) -> StepObserver:
        return _TimedObserver(inner, self.traces)

    async def export(self, engine: Any, period_s: float = 1.0) -> None:
        """The engine's gauges and counters, once a period, forever (the replica's task)."""
        import asyncio

        seen = {"preemptions": 0, "failed_steps": 0, "failed_rows": 0}
        failed = False
        while True:
            s = engine.stats()
            metric("tandem_engine_running").set(s.num_running)
            metric("tandem_engine_waiting").set(s.num_waiting)
            metric("tandem_engine_kv_blocks_used").set(s.total_blocks - s.free_blocks)
            metric("tandem_engine_kv_blocks_total").set(s.total_blocks)
            metric("tandem_engine_prefix_cache_hit_rate").set(s.prefix_cache_hit_rate)
            step = metric("tandem_engine_step_seconds")
            for seconds in engine.drain_step_times():
                step.observe(seconds)
            now = {"preemptions": s.preemptions, "failed_rows": s.failed_rows,
                   "failed_steps": getattr(engine, "failed_steps", 0)}  # fmt: skip
            if now["preemptions"] > seen["preemptions"]:
                metric("tandem_engine_preemptions_total").inc(now["preemptions"] - seen["preemptions"])
            if now["failed_steps"] > seen["failed_steps"]:
                metric("tandem_engine_failures_total").inc(
                    now["failed_steps"] - seen["failed_steps"], tags={"kind": "step"})
            if now["failed_rows"] > seen["failed_rows"]:
                metric("tandem_engine_failures_total").inc(
                    now["failed_rows"] - seen["failed_rows"], tags={"kind": "row"})
            seen = now
            if not failed and getattr(engine, "_failure", None) is not None:
                failed = True
                metric("tandem_engine_failures_total").inc(tags={"kind": "engine"})
            await asyncio.sleep(period_s)


def _count_intervention(action: str, detail: dict, policy: dict[str, str]) -> None:
    if action == "steerer_timeout":
        metric("tandem_steering_timeouts_total").inc(tags=policy)
    elif action == "steerer_error":
        metric("tandem_steering_failures_total").inc(tags=policy)
    elif detail.get("dropped") == "late":
        metric("tandem_steering_late_total").inc(tags=policy)
    else:
        metric("tandem_steering_interventions_total").inc(tags={"action": action, **policy})


class _TimedObserver(StepObserver):
    """A step observer that times each call and hands traced rows' events and actions to the
    trace book; everything else is the wrapped observer's."""

    def __init__(self, inner: StepObserver, traces: TraceBook):
        self.inner = inner
        self.traces = traces

    async def on_step(self, rows: list[RowEvents]) -> list[RowActions]:
        started = time.perf_counter()
        answers = await self.inner.on_step(rows)
        seconds = time.perf_counter() - started
        where = {"where": "colocated" if rows and rows[0].mode == "colocated" else "steerer"}
        metric("tandem_steering_calls_total").inc(tags=where)
        metric("tandem_steering_call_seconds").observe(seconds, where)
        self.traces.on_call(rows, answers, seconds)
        return answers

    def prefetch(self, rows: Any) -> None:
        self.inner.prefetch(rows)

    def release(self, request_ids: list[str]) -> Any:
        return self.inner.release(request_ids)


# ---- router and retrieval -------------------------------------------------------------------


def record_route(decisions: list[dict[str, Any]], started: float) -> None:
    seconds = time.perf_counter() - started
    for d in decisions:
        metric("tandem_router_decisions_total").inc(tags={"adapter": d.get("adapter") or "base"})
        metric("tandem_router_confidence").observe(float(d.get("confidence") or 0.0))
        metric("tandem_router_seconds").observe(seconds)


def record_search(hits: Any, started: float) -> None:
    metric("tandem_retrieval_search_seconds").observe(time.perf_counter() - started)
    if isinstance(hits, list) and hits:
        metric("tandem_retrieval_hits_total").inc(len(hits))


def record_upload(num_bytes: int) -> None:
    if num_bytes > 0:
        metric("tandem_retrieval_upload_bytes_total").inc(num_bytes)


def record_ingest(chunks: int) -> None:
    """Chunks indexed from files attached to a vector store."""
    if chunks > 0:
        metric("tandem_retrieval_chunks_ingested_total").inc(chunks)
