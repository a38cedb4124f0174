"""What comes out of an engine: each step's new tokens and text per request, and counters."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class TokenLogprob:
    """The sampled token's logprob and the top alternatives (token id, logprob)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class Intervention:
    """Something a steering policy did to a request, reported back to the client."""

    step: int  # index of the generated token at which it took effect
    action: str  # e.g. "SteerVector", "Backtrack", "ForceTokens"
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class SpeculationStats:
    """How a speculated request went: k drafted per step, drafts verified, drafts kept."""

    k: int
    proposed: int = 0
    accepted: int = 0


@dataclass
class RequestOutput:
    """What one engine step produced for one request: new tokens and text since the last one.

    `text` holds only text that is final: characters that might still be the start of a stop
    string, or that a backtrack could still take back, are held until they are settled.
    """

    request_id: str
    token_ids: list[int]
    text: str
    finished: bool = False
    finish_reason: str | None = None  # "stop", "length", "abort", "error"
    logprobs: list[TokenLogprob] | None = None
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0
    interventions: list[Intervention] = field(default_factory=list)
    error: str | None = None  # set when finish_reason == "error"
    engine_s: float | None = None  # on the last output: seconds from admission to finish
    # per token of token_ids, the big model's residual stream [len(hidden_layers), hidden_size]
    # it was sampled from (host, float16/bfloat16; None for a forced token), when the request
    # asked for GenerationRequest.hidden_layers
    hidden: list[Any] | None = None
    speculation: SpeculationStats | None = None  # on the last output of a speculated request

    @classmethod
    def merged(cls, outputs: list[RequestOutput]) -> RequestOutput:
        """Consecutive outputs of one request as one (a consumer that fell behind takes all
        that waited at once): tokens, text, logprobs and interventions joined in order, the
        rest as of the last."""
        if len(outputs) == 1:
            return outputs[0]
        last = outputs[-1]
        logprobs = None
        if any(o.logprobs is not None for o in outputs):
            logprobs = [lp for o in outputs for lp in o.logprobs or []]
        hidden = None
        if any(o.hidden is not None for o in outputs):
            hidden = [h for o in outputs for h in o.hidden or []]
        return cls(
            request_id=last.request_id,
            token_ids=[t for o in outputs for t in o.token_ids],
            text="".join(o.text for o in outputs),
            finished=last.finished,
            finish_reason=last.finish_reason,
            logprobs=logprobs,
            num_prompt_tokens=last.num_prompt_tokens,
            num_generated_tokens=last.num_generated_tokens,
            interventions=[i for o in outputs for i in o.interventions],
            error=last.error,
            engine_s=last.engine_s,
            hidden=hidden,
            speculation=last.speculation,
        )


@dataclass
class EngineStats:
    """Counters for metrics and tests."""

    num_running: int = 0
    num_waiting: int = 0
    max_running_seen: int = 0
    steps: int = 0
    generated_tokens: int = 0
    free_blocks: int = 0
    total_blocks: int = 0
    preemptions: int = 0
    observer_calls: int = 0  # step-observer calls: one per engine step with due steered rows
    failed_rows: int = 0  # rows finished with an error because stepping them alone raised
    prefix_cache_hit_rate: float = 0.0  # share of admitted prompt tokens found in the cache
    speculative_proposed: int = 0  # drafted tokens the big model verified
    speculative_accepted: int = 0  # of those, kept


Sink = Callable[["RequestOutput | BaseException"], None]  # called on its event loop


def pump_into(outputs: AsyncIterator[RequestOutput], sink: Sink) -> Callable[[], None]:
    """Hand every output of `outputs` (or the error it raises) to `sink`, from a task on the
    running event loop; returns a function that stops it (leaving `outputs` early: an
    engine's generate then aborts the request)."""

    async def pump() -> None:
        try:
            async for out in outputs:
                sink(out)
        except Exception as exc:  # noqa: BLE001 - the sink learns it
            sink(exc)

    return asyncio.get_running_loop().create_task(pump()).cancel


class OutputBuffer:
    """One request's outputs waiting on its consumer's event loop.

    The producer `put`s outputs (or an error) on that loop. With `merge`, the consumer
    `take`s everything that arrived since its last take as one merged output, so a consumer
    that fell behind catches up in one go instead of one wake-up per token; without, it takes
    them one step at a time.
    """

    __slots__ = ("loop", "merge", "items", "waiter", "ended", "holding")

    def __init__(self, loop: asyncio.AbstractEventLoop, merge: bool = True):
        self.loop = loop
        self.merge = merge
        self.items: list[RequestOutput | BaseException] = []
        self.waiter: asyncio.Future | None = None
        self.ended = False  # the request's last output (or an error) has been put
        self.holding = False

    def put(self, item: RequestOutput | BaseException) -> None:
        """Called on the buffer's event loop."""
        self.items.append(item)
        ends = isinstance(item, BaseException) or item.finished
        self.ended = self.ended or ends
        if self.waiter is not None and not self.waiter.done() and (ends or not self.holding):
            self.waiter.set_result(None)

    async def hold(self, deadline: float) -> None:
        """Wait until `deadline` (the loop's time) so that outputs gather for one merged take,
        but no longer than until the request's end (its last output or an error) arrives: a
        paced stream never holds back its end."""
        if self.ended or deadline <= self.loop.time():
            return
        self.waiter = self.loop.create_future()
        timer = self.loop.call_at(deadline, wake, self.waiter)
        self.holding = True
        try:
            await self.waiter
        finally:
            self.holding = False
            timer.cancel()

    def take_ready(self) -> RequestOutput | None:
        """What arrived since the last take (merged, or the next one), without waiting
        (None: nothing, or an error is next, which `take` raises)."""
        if not self.items or isinstance(self.items[0], BaseException):
            return None
        outputs = [self.items.pop(0)]
        while self.merge and self.items and not isinstance(self.items[0], BaseException):
            outputs.append(self.items.pop(0))
        return RequestOutput.merged(outputs)

    async def take(self) -> RequestOutput:
        """What arrived since the last take (merged, or the next one); raises a delivered
        error once the outputs before it were taken."""
        while not self.items:
            self.waiter = self.loop.create_future()
            await self.waiter
        out = self.take_ready()
        if out is None:
            raise self.items.pop(0)
        return out


def wake(future: asyncio.Future) -> None:
    """Resolve a waiter future unless it is done (a timer's callback)."""
    if not future.done():
        future.set_result(None)
