"""The token path between Ingress and Generator: one Ray message per engine step per Ingress.

A streamed Ray item costs about half a millisecond of CPU on each side, so one item per token
per request caps a node at about 1.8k tok/s (PLATFORM.md). Instead, each Ingress replica is a
*session*: it submits a request with a plain call (any Generator replica, by the usual load
balancing; admission errors come back as HTTP errors), then reads every output of its
requests on that replica through ONE long-lived stream, whose items each carry all the
outputs one engine step made for the session. Both sides hold a request's outputs in an
`OutputBuffer`, so a reader that fell behind takes what waited as one merged output.

`PinnedRouter` is the Generator's request router: a call with the keyword `replica=<id>`
(the stream, an abort) goes to that replica; every other call is routed as Serve always does.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from ray.serve._private.request_router import PowerOfTwoChoicesRequestRouter
from ray.serve.exceptions import BackPressureError
from ray.serve.request_router import PendingRequest, RunningReplica

from models.protocol.errors import TandemError
from models.protocol.outputs import OutputBuffer, RequestOutput, Sink, wake
from models.protocol.requests import GenerationRequest

logger = logging.getLogger("ray.serve")
Listen = Callable[[Sink], Callable[[], None]]  # starts a request's outputs into a sink; -> stop
UNCLAIMED_SESSION_S = 60.0  # a session nobody streams from this long is dropped
IDLE_STREAM_S = 1.0  # a session's stream with nothing to carry this long ends (and reopens)
# how long a submit call waits to carry its requests' first outputs: only a call that goes out
# alone waits; one sent while another is out (a burst) returns once its requests are admitted,
# so that the burst's next requests are not held behind a wait for first tokens
FIRST_OUTPUT_WAIT_S = 0.05
BURST_OUTPUT_WAIT_S = float(os.environ.get("TANDEM_BURST_OUTPUT_WAIT_S", "0"))  # for comparison
# submit calls out at once per Ingress replica: requests that arrive while one call waits for
# its first outputs go out in a second one meanwhile, so a burst's later requests are admitted
# into the engine's next step rather than after the first call's reply
SUBMITS_IN_FLIGHT = int(os.environ.get("TANDEM_SUBMITS_IN_FLIGHT", "2"))  # 1: one at a time


class GeneratorGoneError(TandemError):
    """The Generator replica holding a request went away mid-generation."""

    status_code = 503
    code = "generator_unavailable"


class GeneratorBusyError(TandemError):
    """Every Generator replica is at max_ongoing_requests and the queue for them is full
    (Serve's max_queued_requests): retry later."""

    status_code = 429
    code = "server_busy"


class PinnedRouter(PowerOfTwoChoicesRequestRouter):
    """Power of two choices, except for calls that name their replica (`replica=<id>`)."""

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        target = pending_request.kwargs.get("replica") if pending_request is not None else None
        if target is None:
            return await super().choose_replicas(candidate_replicas, pending_request)
        pinned = [r for r in candidate_replicas if r.replica_id.unique_id == target]
        if not pinned:
            raise GeneratorGoneError(f"Generator replica {target} is gone")
        return [pinned]


@dataclass
class RequestFailure:
    """A request that failed after admission, as it travels in a session's batch."""

    request_id: str
    error: BaseException


def ends(item: RequestOutput | RequestFailure) -> bool:
    """Whether `item` is its request's last: its final output, or its failure."""
    return isinstance(item, RequestFailure) or item.finished


@dataclass
class _Session:
    batch: list[RequestOutput | RequestFailure] = field(default_factory=list)
    waiter: asyncio.Future | None = None
    running: dict[str, Callable[[], None]] = field(default_factory=dict)  # request id -> stop
    claimed: bool = False
    holding: bool = False  # the stream waits for its interval: only a request's end wakes it

    def publish(self, item: RequestOutput | RequestFailure) -> None:
        self.batch.append(item)
        if self.waiter is not None and not self.waiter.done() and (not self.holding or ends(item)):
            self.waiter.set_result(None)

    async def hold(self, wait_s: float) -> None:
        """Sleep `wait_s`, or less if a request's end is published meanwhile."""
        loop = asyncio.get_running_loop()
        self.waiter = loop.create_future()
        timer = loop.call_later(wait_s, wake, self.waiter)  # as OutputBuffer.hold: no task
        self.holding = True
        try:
            await self.waiter
        finally:
            self.holding = False
            timer.cancel()

    def take_ended(self) -> list[RequestOutput | RequestFailure]:
        """The batch's items of requests that ended (the rest stay for their interval)."""
        ended = {item.request_id for item in self.batch if ends(item)}
        if not ended:
            return []
        out = [item for item in self.batch if item.request_id in ended]
        self.batch = [item for item in self.batch if item.request_id not in ended]
        return out

    def stop_all(self) -> None:
        running, self.running = self.running, {}
        for stop in running.values():
            stop()

    async def take(self, idle_s: float) -> list[RequestOutput | RequestFailure] | None:
        """The outputs published since the last take; None once the session had no request
        and no output for `idle_s`."""
        while not self.batch:
            self.waiter = asyncio.get_running_loop().create_future()
            try:
                await asyncio.wait_for(self.waiter, idle_s)
            except TimeoutError:
                if not self.running and not self.batch:
                    return None
        batch, self.batch = self.batch, []
        return batch


def merge_by_request(batch: list) -> list:
    """Consecutive outputs of each request merged into one (failures kept as they are)."""
    runs: dict[str, list[RequestOutput]] = {}
    order: list = []
    for item in batch:
        if isinstance(item, RequestFailure):
            order.append(item)
        elif item.request_id in runs:
            runs[item.request_id].append(item)
        else:
            runs[item.request_id] = [item]
            order.append(item.request_id)
    return [RequestOutput.merged(runs[x]) if isinstance(x, str) else x for x in order]


class Sessions:
    """The Generator's side: each session's outputs, gathered per engine step and sent at
    most every `interval_s` (what was made meanwhile goes merged in one message), except that
    a request's end (its last output, or its failure) goes at once: pacing never delays the
    end of a response."""

    def __init__(self, interval_s: float = 0.0) -> None:
        self._sessions: dict[str, _Session] = {}
        self.interval_s = interval_s

    async def submit(
        self, session: str, admitted: list[tuple[str, Listen]], wait_s: float = FIRST_OUTPUT_WAIT_S,
    ) -> list[RequestOutput | BaseException | None]:
        """Start admitted requests' outputs into their session and return, request for
        request, its first output (or error) if it comes within `wait_s` (it rides on the
        submit call's reply: no stream hop before the first token), else None (it goes to the
        session's stream). A call never waits longer, so a request queued in a full engine
        holds up no other."""
        loop = asyncio.get_running_loop()
        firsts = [loop.create_future() for _ in admitted]
        for (request_id, listen), first in zip(admitted, firsts, strict=True):
            self.start(session, request_id, listen, first)
        if firsts:
            await asyncio.wait(firsts, timeout=wait_s)
        for first in firsts:
            first.cancel()  # not come yet: it goes to the session (no-op if done)
        return [f.result() if not f.cancelled() else None for f in firsts]

    def start(self, session: str, request_id: str, listen: Listen,
              first: asyncio.Future | None = None) -> None:  # fmt: skip
        """Start one admitted request's outputs into its session's batches (its first output
        into `first` while that is still awaited): one call per output, no task."""
        s = self._sessions.get(session)
        if s is None:
            s = self._sessions[session] = _Session()
            asyncio.get_running_loop().call_later(UNCLAIMED_SESSION_S, self._drop_unclaimed, session)
        waiting = [first] if first is not None else []

        def sink(item: RequestOutput | BaseException) -> None:
            if isinstance(item, BaseException) or item.finished:
                s.running.pop(request_id, None)
            if waiting and not (f := waiting.pop()).done():
                f.set_result(item)
            elif isinstance(item, RequestOutput):
                s.publish(item)
            else:
                s.publish(RequestFailure(request_id, item))

        s.running[request_id] = lambda: None  # listen may deliver before it returns its stop
        try:
            stop = listen(sink)
        except Exception as exc:  # noqa: BLE001 - refused when it started: that request fails
            sink(exc)
            return
        if request_id in s.running:
            s.running[request_id] = stop

    def abort(self, request_id: str) -> None:
        for s in self._sessions.values():
            if (stop := s.running.pop(request_id, None)) is not None:
                stop()  # the engine aborts the request

    async def stream(self, session: str) -> AsyncIterator[list]:
        """Every batch of the session until it has been idle for IDLE_STREAM_S (the reader
        opens a new stream with its next request: an idle stream would hold up a replica's
        graceful shutdown) or its reader goes away (then its requests stop)."""
        s = self._sessions.setdefault(session, _Session())
        s.claimed = True
        due, idle = 0.0, False
        try:
            while (batch := await s.take(IDLE_STREAM_S)) is not None:
                if (wait := due - time.monotonic()) > 0:  # within the interval: only ends go
                    s.batch[:0] = batch
                    if not (batch := s.take_ended()):
                        await s.hold(wait)
                        continue
                else:
                    due = time.monotonic() + self.interval_s
                yield merge_by_request(batch)
            idle = True
        finally:
            if not idle:  # the reader went away: its requests stop
                s.stop_all()
            if self._sessions.get(session) is s and (not idle or not s.running):
                del self._sessions[session]
            else:  # a request came in as the stream ended idle: the reader reopens it
                s.claimed = False

    def _drop_unclaimed(self, session: str) -> None:
        s = self._sessions.get(session)
        if s is not None and not s.claimed:
            s.stop_all()
            del self._sessions[session]

    def __len__(self) -> int:
        return len(self._sessions)


class GeneratorStreams:
    """The Ingress's side: submit to any Generator replica, read one stream per replica.

    handle: the Generator deployment's handle. interval_s: least time between two outputs
    handed to one caller (what was made meanwhile comes merged; the last output comes at
    once). max_rate: outputs per second
    handed to all callers together, at most (0: no limit): with N requests streaming, each
    one's interval is at least N / max_rate. `messages` counts the stream items received (one
    per engine step with output for this session, whatever the number of requests).
    """

    def __init__(self, handle: Any, interval_s: float = 0.0, max_rate: float = 0.0):
        self.handle = handle
        self.interval_s = interval_s
        self.max_rate = max_rate
        self.session = uuid.uuid4().hex
        self.buffers: dict[str, tuple[OutputBuffer, str | None]] = {}
        self.early: dict[str, list] = {}  # stream items that overtook their submit's reply
        self.readers: dict[str, asyncio.Task] = {}
        self.queue: list[tuple[GenerationRequest, asyncio.Future]] = []  # waiting to submit
        self.submitters: set[asyncio.Task] = set()
        self.inflight: dict[int, tuple[Any, list]] = {}  # submit calls out: id -> (call, batch)
        self.messages = 0
        self.submit_calls = 0

    async def generate(self, request: GenerationRequest) -> AsyncIterator[RequestOutput]:
        """The request's outputs, merged when the caller fell behind; leaving early aborts it."""
        rid = request.request_id
        buffer = OutputBuffer(asyncio.get_running_loop())
        self.buffers[rid] = (buffer, None)  # before submitting: its first output may come first
        replica, finished = None, False
        try:
            replica, first = await self._submit(request)
            self.buffers[rid] = (buffer, replica)
            if first is not None:
                buffer.put(first)
            for item in self.early.pop(rid, ()):
                buffer.put(item)
            if not (isinstance(first, RequestOutput) and first.finished):
                self._read_from(replica)
            loop = asyncio.get_running_loop()
            due = 0.0  # when the next output may go (the first goes at once; the last too)
            while not finished:
                out = await buffer.take()
                if due > loop.time() and not out.finished:
                    await buffer.hold(due)
                    if (more := buffer.take_ready()) is not None:
                        out = RequestOutput.merged([out, more])
                due = loop.time() + self.interval()
                finished = out.finished
                yield out
        finally:
            self.buffers.pop(rid, None)
            self.early.pop(rid, None)
            if replica is not None and not finished:
                asyncio.create_task(self._abort(rid, replica))

    async def _submit(self, request: GenerationRequest) -> tuple[str, Any]:
        """Admit `request` on a Generator replica: (replica, its first output or None); raises
        what refused it. Requests that arrive while SUBMITS_IN_FLIGHT calls are out go
        together in the next one: one Ray call per burst, not per request. Only a call sent
        while no other is out waits for its requests' first outputs (FIRST_OUTPUT_WAIT_S)."""
        future = asyncio.get_running_loop().create_future()
        self.queue.append((request, future))
        self.submitters = {task for task in self.submitters if not task.done()}
        if len(self.submitters) < SUBMITS_IN_FLIGHT:
            self.submitters.add(asyncio.create_task(self._submit_queued(),
                                                    context=contextvars.Context()))  # fmt: skip
        try:
            return await future
        finally:  # a caller that left: a call none of whose callers wait is withdrawn
            for call, batch in list(self.inflight.values()):
                if all(f.done() for _, f in batch):
                    call.cancel()

    async def _submit_queued(self) -> None:
        while batch := [(r, f) for r, f in self.queue if not f.done()]:
            self.queue = []
            self.submit_calls += 1
            wait_s = BURST_OUTPUT_WAIT_S if self.inflight else FIRST_OUTPUT_WAIT_S
            call = self.handle.submit.remote([request for request, _ in batch], self.session,
                                             wait_s)  # fmt: skip
            self.inflight[id(call)] = (call, batch)
            try:
                replica, results = await call
            except BackPressureError:
                error = GeneratorBusyError("the server is at capacity (every Generator replica "
                                           "busy and its queue full); retry later")  # fmt: skip
                results, replica = [error] * len(batch), None
            except (Exception, asyncio.CancelledError) as exc:  # noqa: BLE001 - each fails
                if not all(f.done() for _, f in batch):  # not withdrawn: a failure
                    if isinstance(exc, asyncio.CancelledError):
                        raise
                results, replica = [exc] * len(batch), None
            finally:
                self.inflight.pop(id(call), None)
            for (request, future), result in zip(batch, results, strict=True):
                if future.done():  # its caller went away meanwhile: stop it there too
                    if replica is not None and not isinstance(result, BaseException):
                        asyncio.create_task(self._abort(request.request_id, replica))
                elif isinstance(result, BaseException):  # refused, or failed before output
                    future.set_exception(result)
                else:
                    future.set_result((replica, result))

    def interval(self) -> float:
        """Least time until a caller's next output: interval_s, or longer when the callers
        together would exceed max_rate outputs per second."""
        if not self.max_rate:
            return self.interval_s
        return max(self.interval_s, len(self.buffers) / self.max_rate)

    async def _abort(self, request_id: str, replica: str) -> None:
        try:
            await self.handle.abort.remote(request_id, replica=replica)
        except Exception:  # noqa: BLE001 - a replica that is gone has nothing to abort
            logger.debug("abort of %s on %s failed", request_id, replica, exc_info=True)

    def _read_from(self, replica: str) -> None:
        task = self.readers.get(replica)
        if task is None or task.done():
            # In a fresh context: Serve would otherwise make the stream a child call of the
            # request that happened to open it, and cancel it (and every request reading it)
            # when that request's client goes away.
            self.readers[replica] = asyncio.create_task(self._read(replica),
                                                        context=contextvars.Context())

    async def _read(self, replica: str) -> None:
        """Read the replica's stream; one that ended idle is reopened while requests wait."""
        try:
            while True:
                stream = self.handle.options(stream=True).stream.remote(self.session,
                                                                        replica=replica)
                async for batch in stream:
                    self.messages += 1
                    for item in batch:
                        rid = item.request_id
                        item = item.error if isinstance(item, RequestFailure) else item
                        if (entry := self.buffers.get(rid)) is None:
                            continue
                        if entry[1] is None:  # its submit's reply (the first output) is due
                            self.early.setdefault(rid, []).append(item)
                        else:
                            entry[0].put(item)
                if not any(where == replica for _, where in self.buffers.values()):
                    return
        except BackPressureError:  # the stream itself waited in a full queue
            error = GeneratorBusyError("the server is at capacity; retry later")
        except BaseException as exc:  # noqa: BLE001 - every request on that replica fails
            error = exc if isinstance(exc, TandemError) else GeneratorGoneError(
                f"the Generator replica {replica} failed mid-generation: {exc!r}")
            if not isinstance(exc, Exception):  # cancelled: its readers learn it, then it ends
                self._fail(replica, error)
                raise
        self._fail(replica, error)

    def _fail(self, replica: str, error: BaseException) -> None:
        for buffer, where in list(self.buffers.values()):
            if where == replica:
                buffer.put(error)
