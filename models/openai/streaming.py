"""A completion's choices as they stream from the engine, and the server-sent events of a
streamed response.

`ChoiceStream` wraps one choice's engine outputs (primed: the first output awaited before the
response starts, so admission errors stay HTTP errors; drained into a result). `sse_events`
writes OpenAI's chunks and ends honestly: a stream that ends abnormally (the engine or its
replica failed, a choice failed) sends `data: {"error": {...}}` and then `data: [DONE]`, and the
last chunk carries the whole `tandem` object a non-streamed response carries (interventions,
errors, unsteered_because).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from models.openai.activations import all_activations, choice_activations
from models.openai.errors import OpenAIError, to_openai_error
from models.openai.protocol import ChoiceError, TandemInfo, UsageInfo, now
from models.openai.speculative import speculation_fields
from models.protocol.outputs import RequestOutput

logger = logging.getLogger("tandem.serving")

UNSTEERED = {  # interventions that leave a row unsteered for the rest of its request
    "steerer_error": "the Steerer failed on this request",
    "steerer_timeout": "the Steerer did not answer within steering.timeout_s",
    "steerer_unavailable": "the Steerer failed repeatedly; it is not consulted for a while",
}


class ChoiceStream:
    """One choice's engine stream: primed (first output awaited) and drained into a result."""

    def __init__(self, it: AsyncIterator[RequestOutput]):
        self.it = it
        self.first: RequestOutput | None = None
        self.text = ""
        self.num_generated = 0
        self.finish_reason: str | None = None
        self.logprobs: list | None = None
        self.interventions: list = []
        self.error: str | None = None
        self.hidden: list = []  # per token (tandem.activations)
        self.speculation = None  # SpeculationStats of a speculated choice, once finished

    async def prime(self) -> None:
        try:
            self.first = await self.it.__anext__()
        except StopAsyncIteration:
            raise OpenAIError("the engine ended the request without output", 500) from None
        raise_if_error(self.first)

    def absorb(self, out: RequestOutput) -> None:
        self.text += out.text
        self.num_generated = max(self.num_generated, out.num_generated_tokens)
        if out.logprobs is not None:
            self.logprobs = (self.logprobs or []) + list(out.logprobs)
        self.interventions.extend(out.interventions)
        self.hidden += out.hidden or []
        if out.finished:
            self.finish_reason = out.finish_reason
            self.error = out.error
            self.speculation = out.speculation

    async def outputs(self) -> AsyncIterator[RequestOutput]:
        if self.first is not None:
            first, self.first = self.first, None
            self.absorb(first)
            yield first
            if first.finished:
                return
        async for out in self.it:
            raise_if_error(out)
            self.absorb(out)
            yield out
            if out.finished:
                return

    async def drain(self) -> ChoiceStream:
        async for _ in self.outputs():
            pass
        return self

    async def close(self) -> None:
        aclose = getattr(self.it, "aclose", None)
        if aclose is not None:
            await aclose()


async def merge_choices(streams: list[ChoiceStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave several choices' outputs as they arrive."""
    if len(streams) == 1:
        async for out in streams[0].outputs():
            yield 0, out
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, s: ChoiceStream) -> None:
        try:
            async for out in s.outputs():
                await queue.put((i, out))
        except BaseException as exc:  # surface the failure in the consumer
            await queue.put((i, exc))
        finally:
            await queue.put((i, done))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    remaining = len(streams)
    try:
        while remaining:
            i, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()


def raise_if_error(out: RequestOutput) -> None:
    """A choice that failed before it made anything is the request's error."""
    if (out.finished and out.finish_reason == "error" and out.error and not out.token_ids
            and not out.text and out.num_generated_tokens == 0):  # fmt: skip
        raise OpenAIError(out.error, 400, code="generation_error")


def intervention(iv: Any) -> dict:
    return {"step": iv.step, "action": iv.action, **({"detail": iv.detail} if iv.detail else {})}


def final_tandem(
    tandem: TandemInfo, choices: list[ChoiceStream], hidden_layers: list[int] | None = None
) -> TandemInfo:
    """The response's `tandem` once every choice ended: each choice's interventions and
    errors, why a steered choice went on unsteered (UNSTEERED), by choice index, and the
    activations asked for (hidden_layers)."""
    interventions = [{"index": i, **intervention(iv)}
                     for i, c in enumerate(choices) for iv in c.interventions]  # fmt: skip
    errors = [ChoiceError(index=i, message=c.error) for i, c in enumerate(choices) if c.error]
    unsteered = [
        {"index": i, "reason": iv.action,
         "message": iv.detail.get("message") or UNSTEERED[iv.action]}
        for i, c in enumerate(choices) for iv in c.interventions if iv.action in UNSTEERED
    ]  # fmt: skip
    return tandem.model_copy(update={"interventions": interventions, "errors": errors or None,
                                     "unsteered_because": unsteered or None,
                                     "activations": all_activations(hidden_layers, choices),
                                     **speculation_fields(choices)})  # fmt: skip


@dataclass
class StreamedResponse:
    """What the SSE writer needs of a prepared request (see serving.PreparedRequest)."""

    request_id: str
    model: str
    tandem: TandemInfo
    num_prompt_tokens: int
    include_usage: bool
    echo: Callable[[int], str] | None  # completions with echo: choice -> its prompt text
    tool_calls: list | None = None  # chat with tools or reasoning: one ChatParser per choice
    hidden_layers: list[int] = field(default_factory=list)  # tandem.activations.layers


def finish_reason(reason: str | None, called: bool) -> str | None:
    """finish_reason "tool_calls" for a choice that stopped after calling tools."""
    return "tool_calls" if called and reason == "stop" else reason


def sse_events(
    resp: StreamedResponse,
    streams: list[ChoiceStream],
    chat: bool,
    logprobs: Callable[[list], Any],
) -> AsyncIterator[str]:
    """The response's server-sent events; `logprobs` turns a choice's TokenLogprobs into the
    response's logprobs model."""
    created = now()
    obj = "chat.completion.chunk" if chat else "text_completion"
    first_tandem = resp.tandem.model_dump()

    def chunk(choices: list[dict], **extra) -> str:
        payload = {"id": resp.request_id, "object": obj, "created": created,
                   "model": resp.model, "choices": choices, **extra}  # fmt: skip
        return f"data: {json.dumps(payload)}\n\n"

    def start(i: int) -> dict:
        body = {"delta": {"role": "assistant", "content": ""}} if chat else {"text": resp.echo(i)}
        return {"index": i, **body, "logprobs": None, "finish_reason": None}

    async def events() -> AsyncIterator[str]:
        finished = 0
        try:
            if chat or resp.echo is not None:
                yield chunk([start(i) for i in range(len(streams))], tandem=first_tandem)
            async for index, out in merge_choices(streams):
                lp = logprobs(out.logprobs).model_dump() if out.logprobs else None
                if not (out.text or out.finished or lp or out.hidden):
                    continue
                body = {"delta": {"content": out.text}} if chat else {"text": out.text}
                reason = out.finish_reason if out.finished else None
                if resp.tool_calls:  # `<tool_call>` output streams as tool-call deltas
                    calls = resp.tool_calls[index]
                    body = {"delta": calls.delta(out.text, out.finished)}
                    reason = finish_reason(reason, bool(calls.calls))
                choice = {"index": index, **body, "logprobs": lp, "finish_reason": reason}
                finished += out.finished
                extra: dict = {}
                if out.hidden:  # the states of this chunk's tokens
                    extra["tandem"] = {"activations": [
                        choice_activations(index, resp.hidden_layers, out.hidden)]}
                if finished == len(streams):  # the last choice ended: the whole tandem object
                    # (activations went with their chunks)
                    final = final_tandem(resp.tandem, streams).model_dump()
                    extra["tandem"] = {**final, **extra.get("tandem", {})}
                elif out.finished and (out.interventions or out.error):
                    extra.setdefault("tandem", {})["interventions"] = [
                        {"index": index, **intervention(iv)} for iv in out.interventions]
                    if out.error:
                        extra["tandem"]["errors"] = [{"index": index, "message": out.error}]
                yield chunk([choice], **extra)
            if resp.include_usage:
                usage = UsageInfo(prompt_tokens=resp.num_prompt_tokens,
                                  completion_tokens=sum(s.num_generated for s in streams))
                yield chunk([], usage=usage.model_dump(),
                            tandem=final_tandem(resp.tandem, streams).model_dump())
            failed = [(i, s.error) for i, s in enumerate(streams) if s.finish_reason == "error"]
            if failed:
                message = "; ".join(f"choice {i}: {error}" for i, error in failed)
                error = OpenAIError(f"generation failed: {message}", 500, code="generation_error")
                yield f"data: {json.dumps(error.to_dict())}\n\n"
            yield "data: [DONE]\n\n"
        except Exception as exc:  # noqa: BLE001 - the client learns it, then the stream ends
            error = to_openai_error(exc)
            if error.status_code >= 500:
                logger.warning("stream %s ended abnormally: %s", resp.request_id, error.message)
            yield f"data: {json.dumps(error.to_dict())}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            await asyncio.gather(*(s.close() for s in streams), return_exceptions=True)

    return events()
