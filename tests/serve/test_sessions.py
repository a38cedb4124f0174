"""The Generator's side of the session token path (deployments/streams.py) in-process: one
batch per engine step for all of a session's requests, an idle stream that ends, an abort."""

from __future__ import annotations

import asyncio

from deployments import streams
from deployments.streams import Sessions
from models.protocol.outputs import RequestOutput, pump_into


async def outputs_of(rid: str, n: int, gate: asyncio.Event) -> None:
    for i in range(n):
        await gate.wait()
        yield RequestOutput(rid, [i], f"t{i}", finished=i == n - 1, finish_reason="length")


def outputs(rid: str, n: int, gate: asyncio.Event):
    """A request's listen function (Engine.listen's default path) over n outputs."""
    return lambda sink: pump_into(outputs_of(rid, n, gate), sink)


def test_a_session_gets_one_batch_per_step_and_its_stream_ends_when_idle(monkeypatch):
    monkeypatch.setattr(streams, "IDLE_STREAM_S", 0.2)

    async def main():
        sessions, gate = Sessions(), asyncio.Event()
        for rid in ("a", "b", "c"):
            sessions.start("s1", rid, outputs(rid, 3, gate))
        gate.set()  # every request makes all its tokens at once: one step's worth each
        batches = [batch async for batch in sessions.stream("s1")]  # ends 0.2 s after the last
        return batches, len(sessions)

    batches, left = asyncio.run(main())
    merged = {out.request_id: out for batch in batches for out in batch}
    assert len(batches) == 1 and len(batches[0]) == 3  # three requests, one message
    assert {rid: out.token_ids for rid, out in merged.items()} == {r: [0, 1, 2] for r in "abc"}
    assert all(out.finished for out in merged.values())
    assert left == 0


def test_abort_stops_only_that_request():
    async def main():
        sessions, gate = Sessions(), asyncio.Event()
        sessions.start("s1", "keep", outputs("keep", 2, gate))
        sessions.start("s1", "drop", outputs("drop", 2, gate))
        sessions.abort("drop")
        gate.set()
        stream = sessions.stream("s1")
        batch = await anext(stream)
        await stream.aclose()
        return batch

    batch = asyncio.run(main())
    assert [out.request_id for out in batch] == ["keep"]


def test_submit_returns_the_first_output_and_streams_the_rest(monkeypatch):
    """A burst's first outputs ride on the submit reply (no stream hop before the first
    token); a request finished by its first output leaves nothing running in the session;
    one whose first output is late (an engine with a queue) comes back None and streams it,
    so it holds up neither the call nor the others."""
    monkeypatch.setattr(streams, "IDLE_STREAM_S", 0.2)

    async def main():
        sessions, gate, late = Sessions(), asyncio.Event(), asyncio.Event()
        gate.set()
        firsts = await sessions.submit("s1", [("long", outputs("long", 3, gate)),
                                              ("short", outputs("short", 1, gate)),
                                              ("queued", outputs("queued", 2, late))],
                                       wait_s=0.1)  # fmt: skip
        late.set()
        batches = [batch async for batch in sessions.stream("s1")]
        return firsts, batches

    (first, short, queued), batches = asyncio.run(main())
    assert (first.token_ids, first.finished) == ([0], False)
    assert (short.token_ids, short.finished) == ([0], True)
    assert queued is None
    rest = {rid: RequestOutput.merged([out for batch in batches for out in batch
                                       if out.request_id == rid]) for rid in ("long", "queued")}
    assert (rest["long"].token_ids, rest["long"].finished) == ([1, 2], True)
    assert (rest["queued"].token_ids, rest["queued"].finished) == ([0, 1], True)


def test_the_chunk_rate_limit_stretches_each_streams_interval():
    """server.max_chunk_rate: with N streams open, each waits at least N / rate between chunks
    (never less than stream_interval_s); no limit leaves stream_interval_s."""
    from deployments.streams import GeneratorStreams

    limited, free = GeneratorStreams(None, 0.05, max_rate=500), GeneratorStreams(None, 0.05)
    for n, expected in ((1, 0.05), (10, 0.05), (64, 64 / 500), (256, 256 / 500)):
        limited.buffers = free.buffers = {f"r{i}": (None, None) for i in range(n)}
        assert limited.interval() == expected and free.interval() == 0.05


def test_only_a_submit_call_that_goes_out_alone_waits_for_first_outputs():
    """A burst: the first request's call goes out alone and may wait for its first output;
    the requests that come while it is out go in calls that return once they are admitted
    (wait 0), so they are not held behind a wait for first tokens; a later lone request
    waits again."""
    from deployments.streams import FIRST_OUTPUT_WAIT_S, GeneratorStreams
    from models.protocol.requests import GenerationRequest, SamplingParams

    calls: list[tuple[list[str], float, asyncio.Future]] = []

    class Submit:  # a plumbing fake of the Generator handle's `submit` (no Ray, no engine)
        def remote(self, requests, session, wait_s):
            reply = asyncio.get_running_loop().create_future()
            calls.append(([r.request_id for r in requests], wait_s, reply))
            return reply

    class Handle:
        submit = Submit()

    def answer(i: int) -> None:
        ids, _, reply = calls[i]
        reply.set_result(("replica-1", [None] * len(ids)))

    async def main():
        s = GeneratorStreams(Handle())

        def submit(rid: str) -> asyncio.Task:
            return asyncio.create_task(s._submit(GenerationRequest(rid, [1], SamplingParams())))

        first = [submit("r0")]
        await asyncio.sleep(0.01)  # r0's call is out, waiting for its first output
        burst = [submit("r1")]
        await asyncio.sleep(0.01)  # r1 goes in a second call
        burst += [submit("r2"), submit("r3")]
        await asyncio.sleep(0.01)  # two calls are out: r2 and r3 wait for one to return
        assert len(calls) == 2
        answer(1)
        await asyncio.sleep(0.01)  # r2 and r3 go together, r0's call still out
        answer(2)
        answer(0)
        results = await asyncio.gather(*first, *burst)
        alone = submit("r4")
        await asyncio.sleep(0.01)
        answer(3)
        return results, await alone

    results, alone = asyncio.run(main())
    assert [(ids, wait) for ids, wait, _ in calls] == [
        (["r0"], FIRST_OUTPUT_WAIT_S), (["r1"], 0.0), (["r2", "r3"], 0.0),
        (["r4"], FIRST_OUTPUT_WAIT_S),
    ]  # fmt: skip
    assert results == [("replica-1", None)] * 4 and alone == ("replica-1", None)


def test_pacing_never_holds_back_a_requests_end():
    """stream_interval_s paces a session's messages, but a request's last output goes at
    once (its response ends as the engine ends it), while the session's other requests keep
    their interval; on the Ingress's side, a held output is let go as its last one arrives."""
    from models.protocol.outputs import OutputBuffer

    interval = 0.5

    async def main():
        sessions, sinks, loop = Sessions(interval_s=interval), {}, asyncio.get_running_loop()

        def listen(rid: str):  # the test plays the engine: it calls each request's sink
            return lambda sink: (sinks.setdefault(rid, sink), lambda: None)[1]

        for rid in ("long", "short"):
            sessions.start("s1", rid, listen(rid))

        def step(i: int, short_ends: bool) -> None:
            sinks["long"](RequestOutput("long", [i], f"l{i}"))
            sinks["short"](RequestOutput("short", [i], f"s{i}", finished=short_ends,
                                         finish_reason="stop" if short_ends else None))

        stream, started = sessions.stream("s1"), loop.time()

        def message():  # the stream's next message (a test that fails doesn't hang)
            return asyncio.wait_for(anext(stream), 2 * interval)

        step(0, short_ends=False)
        first = await message()  # the stream's first message goes at once
        step(1, short_ends=False)
        step(2, short_ends=True)
        ended = await message()
        ended_at = loop.time() - started
        paced = await message()
        paced_at = loop.time() - started

        buffer = OutputBuffer(loop)
        buffer.put(RequestOutput("r", [0], "a"))
        loop.call_later(0.05, buffer.put, RequestOutput("r", [1], "b"))  # does not wake it
        loop.call_later(0.1, buffer.put, RequestOutput("r", [2], "c", finished=True,
                                                       finish_reason="stop"))  # fmt: skip
        held = loop.time()
        await buffer.hold(loop.time() + interval)
        held = loop.time() - held
        await stream.aclose()
        return first, ended, ended_at, paced, paced_at, held, buffer.take_ready()

    first, ended, ended_at, paced, paced_at, held, rest = asyncio.run(main())
    assert {o.request_id for o in first} == {"long", "short"}
    assert [(o.request_id, o.token_ids, o.finished) for o in ended] == [("short", [1, 2], True)]
    assert ended_at < interval / 2  # not held to the interval
    assert [(o.request_id, o.token_ids) for o in paced] == [("long", [1, 2])]
    assert paced_at >= interval * 0.9  # the running request keeps its pace
    assert 0.08 < held < interval / 2
    assert (rest.token_ids, rest.finished) == ([0, 1, 2], True)
