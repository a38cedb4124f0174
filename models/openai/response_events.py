"""A chat completion written back as a Responses API `Response`: its output items and, when
streamed, the events the `openai` SDK expects, in its order:

response.created, response.in_progress; for file_search a `file_search_call` item (added,
in_progress, searching, completed, done); reasoning (`reasoning_text` deltas) and message items
(`content_part.added`, `output_text.delta`..., `output_text.annotation.added` per citation,
`output_text.done`, `content_part.done`, `output_item.done`); one `function_call` item per tool
call (arguments delta and done); then response.completed, .incomplete (max_output_tokens) or
.failed (after an `error` event). Every event carries its `sequence_number`.

One writer serves both ways: a non-streamed answer runs through the same steps with the events
dropped, so the object `response.completed` carries is the one a plain request gets.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

from models.openai.citations import file_citations
from models.openai.protocol import now


def item_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class ResponseWriter:
    """Builds one Response from chat output pieces; each step returns its SSE events.

    request: the Responses request as sent (echoed in the object); file_search: cite the
    retrieved sources and show a file_search_call item; include_results: put the search
    results in that item (`include: ["file_search_call.results"]`).
    """

    def __init__(self, request: dict[str, Any], file_search: bool, include_results: bool,
                 query: str = ""):  # fmt: skip
        self.request, self.file_search, self.include_results = request, file_search, include_results
        self.query = query  # what file_search searched for
        self.id, self.created_at, self.seq = item_id("resp"), now(), 0
        self.output: list[dict] = []
        self.status, self.error, self.incomplete = "in_progress", None, None
        self.usage: dict | None = None
        self.tandem: dict = {}
        self.sources: list[dict] = []
        self.message: dict | None = None  # the open message item
        self.reasoning: dict | None = None  # the open reasoning item
        self.searched = False

    # ---- the object -------------------------------------------------------------------

    def response(self) -> dict[str, Any]:
        r = self.request
        tools = [{"parameters": None, "strict": None, **t} if t.get("type") == "function" else t
                 for t in r.get("tools", [])]  # fmt: skip
        return {
            "id": self.id, "object": "response", "created_at": self.created_at,
            "status": self.status, "model": r["model"], "output": self.output,
            "error": self.error, "incomplete_details": self.incomplete,
            "instructions": r.get("instructions"), "max_output_tokens": r.get("max_output_tokens"),
            "metadata": r.get("metadata") or {}, "parallel_tool_calls": r.get("parallel_tool_calls", True),
            "temperature": r.get("temperature", 1.0), "top_p": r.get("top_p", 1.0),
            "tool_choice": r.get("tool_choice", "auto"), "tools": tools,
            "text": r.get("text") or {"format": {"type": "text"}}, "truncation": "disabled",
            "store": False, "previous_response_id": None, "user": r.get("user"),
            "usage": self.usage, "tandem": self.tandem,
        }  # fmt: skip

    def _event(self, kind: str, **fields: Any) -> str:
        data = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return f"event: {kind}\ndata: {json.dumps(data)}\n\n"

    def _add(self, item: dict) -> tuple[int, list[str]]:
        self.output.append(item)
        index = len(self.output) - 1
        return index, [self._event("response.output_item.added", output_index=index, item=item)]

    def _done(self, item: dict, status: str | None = None) -> str:
        item["status"] = status or ("incomplete" if self.incomplete else "completed")
        return self._event("response.output_item.done", output_index=self.output.index(item),
                           item=item)  # fmt: skip

    # ---- the steps ----------------------------------------------------------------------

    def start(self) -> list[str]:
        snapshot = self.response()
        return [self._event("response.created", response=snapshot),
                self._event("response.in_progress", response=snapshot)]  # fmt: skip

    def search(self, tandem: dict) -> list[str]:
        """The file_search_call item, once: the search ran before the first token."""
        self.tandem = {**self.tandem, **tandem}
        if self.searched or not self.file_search:
            return []
        self.searched, self.sources = True, list(tandem.get("sources") or [])
        item = {"id": item_id("fs"), "type": "file_search_call", "status": "in_progress",
                "queries": [self.query] if self.query else [], "results": None}  # fmt: skip
        index, events = self._add(item)
        for step in ("in_progress", "searching", "completed"):
            events.append(self._event(f"response.file_search_call.{step}", output_index=index,
                                      item_id=item["id"]))  # fmt: skip
        if self.include_results:
            item["results"] = [{"file_id": s["file_id"], "filename": s["filename"],
                                "score": s["score"], "text": s["text"], "attributes": {}}
                               for s in self.sources]  # fmt: skip
        return [*events, self._done(item, "completed")]

    def reasoning_delta(self, text: str) -> list[str]:
        events = []
        if self.reasoning is None:
            events += self._close_message()
            self.reasoning = {"id": item_id("rs"), "type": "reasoning", "summary": [],
                              "status": "in_progress", "content": []}  # fmt: skip
            events += self._open(self.reasoning, {"type": "reasoning_text", "text": ""})
        return events + self._delta(self.reasoning, "response.reasoning_text.delta", text)

    def text_delta(self, text: str) -> list[str]:
        events = []
        if self.message is None:
            events += self._close_reasoning()
            self.message = {"id": item_id("msg"), "type": "message", "role": "assistant",
                            "status": "in_progress", "content": []}  # fmt: skip
            events += self._open(self.message, {"type": "output_text", "text": "",
                                                "annotations": [], "logprobs": []})  # fmt: skip
        return events + self._delta(self.message, "response.output_text.delta", text,
                                    logprobs=[])  # fmt: skip

    def tool_calls(self, calls: list[dict]) -> list[str]:
        if not calls:
            return []
        events = self._close_reasoning() + self._close_message()
        for call in calls:
            fn = call["function"]
            item = {"id": item_id("fc"), "type": "function_call", "call_id": call["id"],
                    "name": fn["name"], "arguments": "", "status": "in_progress"}  # fmt: skip
            index, added = self._add(item)
            events += added
            events.append(self._event("response.function_call_arguments.delta", item_id=item["id"],
                                      output_index=index, delta=fn["arguments"]))  # fmt: skip
            item["arguments"] = fn["arguments"]
            events.append(self._event("response.function_call_arguments.done", item_id=item["id"],
                                      output_index=index, name=fn["name"],
                                      arguments=fn["arguments"]))  # fmt: skip
            events.append(self._done(item))
        return events

    def finish(self, reason: str | None, usage: dict | None, errors: list | None) -> list[str]:
        """Close what is open and end the response: completed, incomplete or failed."""
        if reason == "length":
            self.incomplete = {"reason": "max_output_tokens"}
        events = self._close_reasoning() + self._close_message()
        if usage:
            self.usage = {
                "input_tokens": usage["prompt_tokens"], "output_tokens": usage["completion_tokens"],
                "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"],
                "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
                "output_tokens_details": {"reasoning_tokens": 0},
            }  # fmt: skip
        if reason == "error" or errors:
            message = "; ".join(e["message"] for e in errors or []) or "generation failed"
            return events + self.fail({"code": "server_error", "message": message})
        self.status = "incomplete" if self.incomplete else "completed"
        return [*events, self._event(f"response.{self.status}", response=self.response())]

    def fail(self, error: dict) -> list[str]:
        """An `error` event, then response.failed with the error in the object."""
        self.status, self.error = "failed", {"code": error.get("code") or "server_error",
                                             "message": error.get("message") or "failed"}  # fmt: skip
        return [self._event("error", code=error.get("code"), message=self.error["message"],
                            param=error.get("param")),
                self._event("response.failed", response=self.response())]  # fmt: skip

    # ---- items with one content part ------------------------------------------------------

    def _open(self, item: dict, part: dict) -> list[str]:
        index, events = self._add(item)
        item["content"].append(part)
        events.append(self._event("response.content_part.added", item_id=item["id"],
                                  output_index=index, content_index=0, part=part))  # fmt: skip
        return events

    def _delta(self, item: dict, kind: str, text: str, **extra: Any) -> list[str]:
        item["content"][0]["text"] += text
        return [self._event(kind, item_id=item["id"], output_index=self.output.index(item),
                            content_index=0, delta=text, **extra)]  # fmt: skip

    def _close_reasoning(self) -> list[str]:
        item, self.reasoning = self.reasoning, None
        if item is None:
            return []
        where = {"item_id": item["id"], "output_index": self.output.index(item), "content_index": 0}
        part = item["content"][0]
        return [self._event("response.reasoning_text.done", **where, text=part["text"]),
                self._event("response.content_part.done", **where, part=part), self._done(item)]

    def _close_message(self) -> list[str]:
        item, self.message = self.message, None
        if item is None:
            return []
        where = {"item_id": item["id"], "output_index": self.output.index(item), "content_index": 0}
        part, events = item["content"][0], []
        if self.file_search:
            part["annotations"] = file_citations(part["text"], self.sources)
            events += [self._event("response.output_text.annotation.added", **where,
                                   annotation_index=i, annotation=a)
                       for i, a in enumerate(part["annotations"])]  # fmt: skip
        return [*events, self._event("response.output_text.done", **where, text=part["text"],
                                     logprobs=[]),
                self._event("response.content_part.done", **where, part=part), self._done(item)]

    # ---- from chat output -------------------------------------------------------------------

    def from_chat(self, answer: dict) -> dict:
        """A non-streamed chat completion as the Response object."""
        choice, tandem = answer["choices"][0], answer.get("tandem") or {}
        message = choice["message"]
        if choice["finish_reason"] == "length":  # items close before finish: mark them so
            self.incomplete = {"reason": "max_output_tokens"}
        self.search(tandem)
        if message.get("reasoning_content"):
            self.reasoning_delta(message["reasoning_content"])
        if message.get("content"):
            self.text_delta(message["content"])
        self.tool_calls(message.get("tool_calls") or [])
        self.finish(choice["finish_reason"], answer["usage"], tandem.get("errors"))
        return self.response()

    async def events(self, chunks: AsyncIterator[str]) -> AsyncIterator[str]:
        """A streamed chat completion (its SSE lines) as the Response's events."""
        for event in self.start():
            yield event
        reason = None
        try:
            async for line in chunks:
                data = line.removeprefix("data: ").strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    for event in self.fail(chunk["error"]):
                        yield event
                    return
                events = self.search(chunk["tandem"]) if chunk.get("tandem") else []
                if chunk.get("usage"):
                    self.usage = chunk["usage"]
                for choice in chunk.get("choices") or []:
                    delta = choice.get("delta") or {}
                    if delta.get("reasoning_content"):
                        events += self.reasoning_delta(delta["reasoning_content"])
                    if delta.get("content"):
                        events += self.text_delta(delta["content"])
                    events += self.tool_calls(delta.get("tool_calls") or [])
                    reason = choice.get("finish_reason") or reason
                for event in events:
                    yield event
            for event in self.finish(reason, self.usage, self.tandem.get("errors")):
                yield event
        finally:
            aclose = getattr(chunks, "aclose", None)
            if aclose is not None:
                await aclose()


class ResponseEvents:
    """A streamed Response's SSE events, and how the stream ends when cut short (the request's
    deadline, a replica gone): `failure` gives the `error` event and `response.failed` the SDK
    expects, where a chat stream would end with an error chunk and `[DONE]`."""

    def __init__(self, writer: ResponseWriter, chunks: AsyncIterator[str]):
        self.writer, self._events = writer, writer.events(chunks)

    def __aiter__(self) -> ResponseEvents:
        return self

    async def __anext__(self) -> str:
        return await anext(self._events)

    async def aclose(self) -> None:
        await self._events.aclose()

    def failure(self, error: dict) -> list[str]:
        """The closing events for an OpenAI error body's `error` object."""
        return self.writer.fail(error)
