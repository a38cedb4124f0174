"""TorchEngine: the async `Engine` protocol over LLMEngine, stepped by one engine thread.

Callers on the event loop never touch LLMEngine directly: requests, aborts and adapter
changes go through an inbox the engine thread drains between steps. Each step's outputs cross
to the event loop in ONE hand-off (call_soon_threadsafe per step, not per output) and land in
per-request buffers that each consumer reads step by step: the loop's work per step stays
small, so the engine thread keeps the GIL for stepping. Step observer coroutines run on the
caller's event loop.

The model is built on the engine thread too: every torch op big enough to run on OpenMP's
threads then starts from one thread. A second thread's parallel regions get an OpenMP team of
their own, and on a small CPU two teams spin against each other (measured on 2 cores: steps
of 16 rows took 7.8 ms from a second thread against 4.4 ms from the thread that built the
model).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import sys
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import torch

from models.engine.config import EngineConfig
from models.engine.llm_engine import LLMEngine
from models.protocol.drafter import Drafter
from models.protocol.engine import Engine, EngineCapabilities
from models.protocol.errors import EngineError, EngineFailedError
from models.protocol.outputs import EngineStats, OutputBuffer, RequestOutput, Sink
from models.protocol.requests import GenerationRequest
from models.protocol.steering import StepObserver

logger = logging.getLogger(__name__)


class TorchEngine(Engine):
    """The own torch engine: continuous batching, paged KV, steering hooks, per-row LoRA."""

    name = "torch"
    capabilities = EngineCapabilities.all()

    def __init__(self, config: EngineConfig, model_path: str | Path, tokenizer: Any = "auto"):
        self._inbox: queue.Queue[Callable[[], None]] = queue.Queue()
        self._streams: dict[str, OutputBuffer | _Listener] = {}
        self._stopping = False
        self._failure: BaseException | None = None
        self._started = False
        self.failed_steps = 0
        self._step_times: deque[float] = deque(maxlen=8192)  # for metrics; deque: thread-safe
        if config.gil_switch_interval_ms:  # process-wide: the replica's event loop gets it too
            sys.setswitchinterval(config.gil_switch_interval_ms / 1000)
        built: concurrent.futures.Future = concurrent.futures.Future()
        self._thread = threading.Thread(
            target=self._run, args=(built, config, model_path, tokenizer), name="torch-engine",
            daemon=True)  # fmt: skip
        self._thread.start()
        built.result()  # raises what building the model raised
        self.tokenizer = self.core.tokenizer

    async def start(self) -> None:
        """Steering observer coroutines run on the first caller's event loop."""
        if not self._started:
            self._started = True
            self.core.steering.runner.loop = asyncio.get_running_loop()

    def _run(self, built: concurrent.futures.Future, *args: Any) -> None:
        try:
            self.core = LLMEngine(*args)
        except BaseException as exc:
            built.set_exception(exc)
            return
        built.set_result(self.core)
        self._loop()

    def shutdown(self) -> None:
        self._stopping = True
        self._inbox.put(lambda: None)
        self._thread.join(timeout=10)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[RequestOutput]:
        """Stream RequestOutputs token by token; the last has finished=True."""
        await self.start()
        self._raise_if_failed()
        self.core.check_request(request)
        stream = OutputBuffer(asyncio.get_running_loop(), merge=False)  # step by step
        self._streams[request.request_id] = stream
        self._inbox.put(lambda: self._add(request))
        finished = False
        try:
            while not finished:
                out = await stream.take()
                finished = out.finished
                yield out
        finally:
            self._streams.pop(request.request_id, None)
            if not finished:
                self._inbox.put(lambda: self.core.abort(request.request_id))

    def listen(self, request: GenerationRequest, sink: Sink) -> Callable[[], None]:
        """Each step's output straight to `sink` on the caller's loop: one call per output,
        no task per request (what `generate` costs per token: a buffer, a task wake-up and
        its generator frames, on the loop the engine thread shares the GIL with)."""
        self._raise_if_failed()
        self.core.check_request(request)
        rid = request.request_id
        self._streams[rid] = _Listener(asyncio.get_running_loop(), sink, self._streams, rid)
        self._inbox.put(lambda: self._add(request))

        def stop() -> None:
            if self._streams.pop(rid, None) is not None:  # not finished yet
                self._inbox.put(lambda: self.core.abort(rid))

        return stop

    def check_request(self, request: GenerationRequest) -> None:
        self.core.check_request(request)  # reads only: safe beside the engine thread

    async def abort(self, request_id: str) -> None:
        self._inbox.put(lambda: self.core.abort(request_id))

    async def check_health(self) -> None:
        self._raise_if_failed()
        if not self._thread.is_alive() and not self._stopping:
            raise EngineFailedError("the engine thread is not running")

    async def load_adapter(self, name: str, path: str) -> None:
        await self.run_in_engine_thread(lambda: self.core.adapters.load(name, path))

    async def unload_adapter(self, name: str) -> None:
        await self.run_in_engine_thread(lambda: self.core.adapters.unload(name))

    def adapters(self) -> list[str]:
        return self.core.adapters.names()

    def register_vector(self, name: str, vector: torch.Tensor) -> None:
        """A steering vector [num_layers, hidden] for SteerVector actions and steer_vectors."""
        self.core.register_vector(name, vector)  # one dict store: safe beside the engine thread

    def set_step_observer(self, observer: StepObserver | None) -> None:
        """See LLMEngine.set_step_observer; its coroutines run on the caller's event loop."""
        self.core.set_step_observer(observer)

    def set_drafter(self, drafter: Drafter | None) -> None:
        """See LLMEngine.set_drafter. Call before start or on the engine thread
        (run_in_engine_thread): the drafter then runs on the engine thread only (a small model
        shared with a Steerer that runs elsewhere is not safe)."""
        self.core.set_drafter(drafter)

    def stats(self) -> EngineStats:
        return self.core.stats()

    def drain_step_times(self) -> list[float]:
        times = self._step_times
        return [times.popleft() for _ in range(len(times))]

    async def run_in_engine_thread(self, fn: Callable[[], Any]) -> Any:
        """fn() on the engine thread between steps; its result or exception."""
        await self.start()
        done: concurrent.futures.Future = concurrent.futures.Future()

        def call() -> None:
            try:
                done.set_result(fn())
            except BaseException as exc:
                done.set_exception(exc)

        self._inbox.put(call)
        return await asyncio.wrap_future(done)

    def _add(self, request: GenerationRequest) -> None:
        """Admit one request; whatever it gets wrong fails it alone, never the engine."""
        try:
            self.core.add_request(request)
        except Exception as exc:  # noqa: BLE001 - the request's stream reports it
            if not isinstance(exc, EngineError):
                logger.exception("admitting %s failed", request.request_id)
                exc = EngineError(f"the request could not be admitted: {exc!r}")
            self._deliver([(request.request_id, exc)])

    def _deliver(self, items: list[RequestOutput] | list[tuple[str, BaseException]]) -> None:
        """Hand one step's outputs (or errors by request id) to their event loops: one
        call_soon_threadsafe per loop, whatever the number of rows."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for item in items:
            request_id = item[0] if isinstance(item, tuple) else item.request_id
            stream = self._streams.get(request_id)
            if stream is not None:
                by_loop.setdefault(stream.loop, []).append((stream, item))
        for loop, batch in by_loop.items():
            loop.call_soon_threadsafe(_put_all, batch)

    def _loop(self) -> None:
        try:
            while not self._stopping:
                self._drain_inbox(block=not self.core.has_unfinished())
                if self.core.has_unfinished():
                    self._deliver(self._step())
        except BaseException as exc:
            self._failure = exc
            error = EngineFailedError(f"the engine failed: {exc!r}")
            self._deliver([(request_id, error) for request_id in list(self._streams)])

    def _step(self) -> list[RequestOutput]:
        """One engine step; if it raises, its requests end with an error and serving goes on."""
        started = time.perf_counter()
        try:
            return self.core.step()
        except Exception as exc:
            logger.exception("engine step failed")
            self.failed_steps += 1
            return self.core.fail_all(f"the engine step failed: {exc!r}")
        finally:
            self._step_times.append(time.perf_counter() - started)

    def _drain_inbox(self, block: bool) -> None:
        try:
            task = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            task()
            try:
                task = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _raise_if_failed(self) -> None:
        if self._failure is not None:
            raise EngineFailedError(f"the engine failed: {self._failure!r}")


class _Listener:
    """A listened request's place in TorchEngine._streams: `put` hands an output to the sink
    (and forgets the request once it ended)."""

    __slots__ = ("loop", "sink", "streams", "request_id")

    def __init__(self, loop: asyncio.AbstractEventLoop, sink: Sink, streams: dict, request_id: str):
        self.loop, self.sink, self.streams, self.request_id = loop, sink, streams, request_id

    def put(self, item: RequestOutput | BaseException) -> None:
        if self.streams.get(self.request_id) is not self:  # stopped meanwhile
            return
        if isinstance(item, BaseException) or item.finished:
            del self.streams[self.request_id]
        self.sink(item)


def _put_all(batch: list[tuple[OutputBuffer, RequestOutput | tuple[str, BaseException]]]) -> None:
    for stream, item in batch:
        stream.put(item[1] if isinstance(item, tuple) else item)
