"""The Generator's trace book (models/tracing.py) in-process: steps, calls and interventions of
a traced request, its bounds (steps per choice, traces kept, time kept) and its JSON-lines file."""

from __future__ import annotations

import json

from models.protocol.outputs import Intervention, RequestOutput
from models.protocol.requests import GenerationRequest
from models.protocol.steering import (
    ForwardPass,
    RowActions,
    RowEvents,
    Sampled,
    SteeringRequest,
    SteerVector,
)
from models.tracing import TelemetryConfig, TraceBook


def request(rid: str, trace: str | None = "req-1") -> GenerationRequest:
    return GenerationRequest(rid, [1, 2, 3], steering=SteeringRequest(policy="guard", mode="sync"),
                             trace_id=trace)  # fmt: skip


def out(rid: str, tokens: list[int], n: int, **kw) -> RequestOutput:
    return RequestOutput(rid, tokens, "x" * len(tokens), num_generated_tokens=n, **kw)


def test_a_traced_request_lists_tokens_calls_and_interventions(tmp_path):
    book = TraceBook(TelemetryConfig(trace_dir=str(tmp_path)))
    assert not book.start(request("chatcmpl-a-0", trace=None))
    assert book.start(request("chatcmpl-b-0"))
    rows = [RowEvents("chatcmpl-b-0", [ForwardPass(step=0)], policy="guard")]
    book.on_call(rows, [RowActions("chatcmpl-b-0", [SteerVector("positive", 1.0)])], 0.004)
    book.on_output(out("chatcmpl-b-0", [7], 1, interventions=[Intervention(0, "SteerVector")]))
    book.on_call([RowEvents("chatcmpl-b-0", [Sampled(0, 7), ForwardPass(step=1)], "guard")],
                 [RowActions("chatcmpl-b-0")], 0.002)  # fmt: skip
    book.on_output(out("chatcmpl-b-0", [8, 9], 3, finished=True, finish_reason="length"))
    trace = book.get("req-1")
    (choice,) = trace["choices"]
    assert choice["finished"] and choice["finish_reason"] == "length"
    assert [s["token_id"] for s in choice["steps"]] == [7, 8, 9]
    first = choice["steps"][0]
    assert first["interventions"] == [{"step": 0, "action": "SteerVector"}] == choice["interventions"]
    assert first["calls"][0]["actions"][0] == {"type": "SteerVector", "name": "positive",
                                               "coeff": 1.0, "layers": None}  # fmt: skip
    assert first["calls"][0]["latency_ms"] == 4.0 and first["calls"][0]["policy"] == "guard"
    assert choice["steps"][1]["calls"][0]["events"][0] == {"type": "Sampled", "step": 0,
                                                           "token_id": 7}  # fmt: skip
    lines = (tmp_path / "traces.jsonl").read_text().splitlines()
    assert [json.loads(line)["request_id"] for line in lines] == ["req-1"]


def test_traces_are_bounded_in_steps_count_and_time(monkeypatch):
    book = TraceBook(TelemetryConfig(trace_max_steps=4, max_traces=2, trace_ttl_s=60))
    for i in range(3):
        book.start(request(f"r{i}-0", trace=f"t{i}"))
        book.on_output(out(f"r{i}-0", list(range(10)), 10, finished=True, finish_reason="length"))
    assert book.get("t0") is None  # the oldest beyond max_traces
    choice = book.get("t2")["choices"][0]
    assert len(choice["steps"]) == 4 and choice["steps_dropped"] == 6
    import models.tracing as tracing

    later = tracing.time.monotonic() + 61
    monkeypatch.setattr(tracing.time, "monotonic", lambda: later)
    assert book.get("t1") is None and book.get("t2") is None


def test_an_aborted_request_closes_its_trace():
    book = TraceBook()
    book.start(request("r-0"))
    book.on_output(out("r-0", [5], 1))
    assert not book.get("req-1")["choices"][0]["finished"]
    book.close("r-0")
    assert book.get("req-1")["choices"][0]["finished"] and not book.live
