"""The Responses API (`POST /v1/responses`) as a view over chat completions.

A Responses request becomes one chat request: `instructions` a system message first, `input`
(text, or items: messages, `function_call` and `function_call_output`) the conversation, function
tools chat tools, the `file_search` tool a `rag` search of Tandem's own vector stores (its
`filters`, `max_num_results` and `ranking_options.score_threshold` as vector-store search takes
them), `text.format` the `response_format`. The chat answer (a dict, or its stream) is written
back as Responses output items and events by models/openai/response_events.py.

Nothing is stored (`store: false` semantics): `store: true`, `previous_response_id` and every
field or value Tandem cannot honour are a 400 naming the field.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from models.openai.errors import OpenAIError
from models.openai.protocol import parse_request
from models.openai.response_events import ResponseEvents, ResponseWriter

# chat fields (Tandem's extensions and samplers the Responses API lacks) passed through as sent
PASSTHROUGH = ("seed", "top_k", "stop", "presence_penalty", "frequency_penalty",
               "repetition_penalty", "min_tokens", "ignore_eos", "steering", "adapter", "tandem")  # fmt: skip
INCLUDABLE = ("file_search_call.results",)
# chat's names for what a Responses request calls otherwise (errors name the client's field)
PARAMS = {"max_completion_tokens": "max_output_tokens", "messages": "input",
          "response_format": "text.format", "rag": "tools", "tool_choice": "tool_choice"}  # fmt: skip
# output items a client sends back with the next turn that carry nothing for the prompt
SKIPPED_ITEMS = ("file_search_call", "reasoning")


class ResponsesRequest(BaseModel):
    """Body of POST /v1/responses. Unknown fields are kept (model_extra) and refused by name."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    tools: list[dict[str, Any]] = Field(default_factory=list)
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: dict[str, Any] | None = None
    include: list[str] | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    store: bool | None = None
    previous_response_id: str | None = None
    truncation: Literal["auto", "disabled"] | None = None
    reasoning: dict[str, Any] | None = None
    background: bool | None = None
    service_tier: str | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)

    def refuse_unserved(self) -> None:
        """400 naming the first field this server cannot honour."""
        unknown = sorted(k for k in self.model_extra or {} if k not in PASSTHROUGH)
        if unknown:
            raise OpenAIError(f"unsupported parameter(s): {', '.join(unknown)}; this server "
                              "cannot honour them", param=unknown[0],
                              code="unsupported_parameter")  # fmt: skip
        refused = {
            "store": (self.store, "responses are not stored here; send store: false and the "
                      "whole conversation as input"),
            "previous_response_id": (self.previous_response_id, "responses are not stored "
                                     "here; send the earlier output items in input instead"),
            "truncation": (self.truncation == "auto", "truncation 'auto' is not supported"),
            "reasoning": (self.reasoning, "reasoning options are not supported"),
            "background": (self.background, "background responses are not supported"),
            "top_logprobs": (self.top_logprobs, "top_logprobs is not supported here"),
            "service_tier": (self.service_tier not in (None, "auto", "default"),
                             "only service_tier 'auto' or 'default'"),
            "stream_options": (any((self.stream_options or {}).values()), "stream_options "
                               "are not supported (include_obfuscation must be false)"),
            "text": (set(self.text or {}) - {"format"} or not isinstance(
                (self.text or {}).get("format", {}), dict), "text takes only a format object"),
        }  # fmt: skip
        for name, (bad, why) in refused.items():
            if bad:
                raise OpenAIError(why, param=name, code="unsupported_parameter")
        for i, name in enumerate(self.include or []):
            if name not in INCLUDABLE:
                raise OpenAIError(f"include '{name}' is not supported; supported: "
                                  f"{', '.join(INCLUDABLE)}", param=f"include[{i}]")  # fmt: skip

    @property
    def file_search(self) -> dict | None:
        return next((t for t in self.tools if t.get("type") == "file_search"), None)

    def chat_body(self) -> dict[str, Any]:
        """The chat completion request that answers this one."""
        functions, search = chat_tools(self.tools)
        messages = [{"role": "system", "content": self.instructions}] if self.instructions else []
        messages += input_messages(self.input)
        if not messages:
            raise OpenAIError("input must not be empty", param="input")
        body: dict[str, Any] = {"model": self.model, "messages": messages,
                                "stream": self.stream, **(self.model_extra or {})}  # fmt: skip
        if self.stream:
            body["stream_options"] = {"include_usage": True}
        for name, value in (("max_completion_tokens", self.max_output_tokens),
                            ("temperature", self.temperature), ("top_p", self.top_p),
                            ("user", self.user),
                            ("parallel_tool_calls", self.parallel_tool_calls)):  # fmt: skip
            if value is not None:
                body[name] = value
        choice = chat_tool_choice(self.tool_choice, bool(functions), search is not None)
        if functions and choice != "none":
            body["tools"] = functions
            if choice is not None:
                body["tool_choice"] = choice
        if search is not None and choice != "none":
            body["rag"] = search
        if fmt := (self.text or {}).get("format"):
            body["response_format"] = response_format(fmt)
        return body


def chat_tools(tools: list[dict]) -> tuple[list[dict], dict | None]:
    """(chat function tools, the `rag` options of a file_search tool or None)."""
    functions, search = [], None
    for i, tool in enumerate(tools):
        kind = tool.get("type")
        if kind == "function":
            extra = set(tool) - {"type", "name", "description", "parameters", "strict"}
            if extra:
                raise OpenAIError(f"function tool field '{sorted(extra)[0]}' is not supported",
                                  param=f"tools[{i}].{sorted(extra)[0]}")  # fmt: skip
            fn = {k: tool[k] for k in ("name", "description", "parameters", "strict")
                  if tool.get(k) is not None}  # fmt: skip
            functions.append({"type": "function", "function": fn})
        elif kind == "file_search":
            if search is not None:
                raise OpenAIError("at most one file_search tool", param=f"tools[{i}]")
            search = file_search_options(tool, f"tools[{i}]")
        else:
            raise OpenAIError(f"tool type {kind!r} is not supported; supported: function, "
                              "file_search", param=f"tools[{i}].type")  # fmt: skip
    return functions, search


def file_search_options(tool: dict, where: str) -> dict:
    """A file_search tool as chat's `rag` options over Tandem's vector stores."""
    extra = set(tool) - {"type", "vector_store_ids", "filters", "max_num_results",
                         "ranking_options"}  # fmt: skip
    if extra:
        raise OpenAIError(f"file_search field '{sorted(extra)[0]}' is not supported",
                          param=f"{where}.{sorted(extra)[0]}")  # fmt: skip
    ids = tool.get("vector_store_ids")
    if not (isinstance(ids, list) and ids and all(isinstance(s, str) for s in ids)):
        raise OpenAIError("file_search needs vector_store_ids: a non-empty list of ids",
                          param=f"{where}.vector_store_ids")  # fmt: skip
    ranking = tool.get("ranking_options") or {}
    if not isinstance(ranking, dict) or set(ranking) - {"ranker", "score_threshold"} or ranking.get("ranker") not in (
            None, "auto", "default-2024-11-15"):  # fmt: skip
        raise OpenAIError("ranking_options: only score_threshold (and ranker 'auto') are "
                          "supported", param=f"{where}.ranking_options")  # fmt: skip
    rag: dict[str, Any] = {"vector_store_ids": ids, "top_k": tool.get("max_num_results") or 10}
    if ranking.get("score_threshold") is not None:
        rag["score_threshold"] = ranking["score_threshold"]
    if tool.get("filters") is not None:
        rag["filters"] = tool["filters"]
    return rag


def chat_tool_choice(choice: str | dict | None, functions: bool, search: bool) -> Any:
    """Chat's tool_choice for a Responses one ("none", "auto", "required", a named function;
    `{"type": "file_search"}` searches, as a file_search tool always does here)."""
    if choice is None or choice in ("none", "auto"):
        return choice
    if choice == "required":
        if functions:
            return "required"
        if search:
            return None
    if isinstance(choice, dict):
        if choice.get("type") == "function" and isinstance(choice.get("name"), str):
            return {"type": "function", "function": {"name": choice["name"]}}
        if choice.get("type") == "file_search" and search:
            return None
    raise OpenAIError(f"tool_choice {json.dumps(choice)} is not supported here (none, auto, "
                      "required, a function by name, or file_search with a file_search tool)",
                      param="tool_choice")  # fmt: skip


def response_format(fmt: dict) -> dict:
    """`text.format` as chat's response_format (json_schema fields one level up)."""
    if fmt.get("type") == "json_schema":
        keys = ("name", "schema", "description", "strict")
        return {"type": "json_schema", "json_schema": {k: fmt[k] for k in keys if k in fmt}}
    return fmt


def _text(content: Any, where: str) -> str:
    """A message's content: a string, or input_text / output_text parts joined."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise OpenAIError("content must be a string or a list of text parts", param=where)
    texts = []
    for j, part in enumerate(content):
        if not (isinstance(part, dict) and part.get("type") in ("input_text", "output_text")
                and isinstance(part.get("text"), str)):  # fmt: skip
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise OpenAIError(f"content part of type {kind!r} is not supported; only "
                              "input_text and output_text", param=f"{where}[{j}]")  # fmt: skip
        texts.append(part["text"])
    return "".join(texts)


def input_messages(input: str | list[dict]) -> list[dict]:
    """`input` as chat messages: text is one user message; items keep their order, function
    calls joining the assistant message before them, outputs becoming tool messages."""
    if isinstance(input, str):
        return [{"role": "user", "content": input}]
    messages: list[dict] = []
    for i, item in enumerate(input):
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise OpenAIError(f"message role {role!r} is not supported",
                                  param=f"input[{i}].role")  # fmt: skip
            messages.append({"role": role, "content": _text(item.get("content"),
                                                            f"input[{i}].content")})  # fmt: skip
        elif kind == "function_call":
            call = {"id": _field(item, "call_id", i), "type": "function", "function": {
                "name": _field(item, "name", i), "arguments": _field(item, "arguments", i)}}
            last = messages[-1] if messages else None
            if last and last["role"] == "assistant" and last.get("tool_calls") is not None:
                last["tool_calls"].append(call)
            elif last and last["role"] == "assistant":
                last["tool_calls"] = [call]
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            text = output if isinstance(output, str) else _text(output, f"input[{i}].output")
            messages.append({"role": "tool", "tool_call_id": _field(item, "call_id", i),
                             "content": text})  # fmt: skip
        elif kind not in SKIPPED_ITEMS:
            raise OpenAIError(f"input item type {kind!r} is not supported; supported: message, "
                              "function_call, function_call_output (file_search_call and "
                              "reasoning items are skipped)", param=f"input[{i}].type")  # fmt: skip
    return messages


def _field(item: dict, name: str, i: int) -> str:
    value = item.get(name)
    if not isinstance(value, str) or not value:
        raise OpenAIError(f"{item.get('type')} items need '{name}' (a string)",
                          param=f"input[{i}].{name}")  # fmt: skip
    return value


class ResponsesServing:
    """POST /v1/responses over the chat completions of an OpenAIServing."""

    def __init__(self, serving: Any):
        self.serving = serving

    async def create(self, body: Any) -> dict | AsyncIterator[str]:
        """A Response object, or an async iterator of its server-sent events when streamed."""
        req = parse_request(ResponsesRequest, body)
        req.refuse_unserved()
        body = req.chat_body()
        if "rag" in body and self.serving.backends.search is None:
            raise OpenAIError("file_search needs retrieval, which is off in this deployment "
                              "(retrieval.enabled: false)", 400, param="tools",
                              code="retrieval_disabled")  # fmt: skip
        try:
            answer = await self.serving.chat(body)
        except OpenAIError as exc:
            head, dot, rest = (exc.param or "").partition(".")
            if head in PARAMS:  # the client named it otherwise
                exc.param = PARAMS[head] + (dot + rest if head != "messages" else "")
            raise
        query = next((m["content"] for m in reversed(body["messages"]) if m["role"] == "user"), "")
        writer = ResponseWriter(req.model_dump(exclude_none=True), req.file_search is not None,
                                bool(req.include), query)  # fmt: skip
        if isinstance(answer, dict):
            return writer.from_chat(answer)
        return ResponseEvents(writer, answer)
