"""Structured output and tools in chat: `response_format`, `tools` / `tool_choice` as request
types, the grammar each asks of the engine, and the model's `<tool_call>` output parsed back.

Tool calls use the Hermes / Qwen convention the built-in and Qwen-family templates speak: the
assistant writes `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`. `required` and a
named `tool_choice` constrain the output to exactly that, with arguments that match the
function's parameter schema (a Lark grammar embedding the JSON schema); `auto` leaves the model
free to write text or call, but a call it begins is held to the same grammar (a lazy trigger
on `<tool_call>`), and the calls it wrote are parsed.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from models.openai.errors import OpenAIError
from models.protocol.constraints import OutputConstraint

TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
TOOL_CALL_OPEN = "<tool_call>"
# a call's JSON exactly as the Hermes / Qwen templates write calls (json.dumps: ", " and ": "),
# the way models are trained to write them; no other whitespace, so none can pad a call
CALL_JSON = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    json_schema: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """`response_format`: text, any JSON object, or JSON matching a schema (grammar-exact)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _check(self):
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is required with type json_schema, and only with it")
        return self

    def constraint(self) -> OutputConstraint | None:
        if self.type == "json_object":
            return OutputConstraint("json_object")
        if self.type == "json_schema":
            return OutputConstraint("json_schema", json.dumps(self.json_schema.json_schema))
        return None


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object"})
    strict: bool | None = None


class ToolDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    function: FunctionName


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    arguments: str


class ToolCall(BaseModel):
    """An assistant message's tool call, as clients send it back in the history."""

    model_config = ConfigDict(extra="forbid")

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class ChatTools(BaseModel):
    """The tool fields of a chat request, checked together."""

    tools: list[ToolDefinition] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool = True

    def check(self) -> None:
        names = [t.function.name for t in self.tools or []]
        if self.tool_choice is not None and self.tool_choice != "none" and not names:
            raise OpenAIError("tool_choice needs tools", param="tool_choice")
        if isinstance(self.tool_choice, NamedToolChoice):
            if self.tool_choice.function.name not in names:
                raise OpenAIError(
                    f"tool_choice names function '{self.tool_choice.function.name}', which is "
                    f"not in tools ({', '.join(names)})", param="tool_choice",
                )  # fmt: skip
        if len(set(names)) != len(names):
            raise OpenAIError("tool function names must be unique", param="tools")

    @property
    def active(self) -> bool:
        """Tools are offered to the model (rendered, and calls parsed)."""
        return bool(self.tools) and self.tool_choice != "none"

    def constraint(self) -> OutputConstraint | None:
        """The grammar of the tool calls. `required` / a named choice: tool calls only. `auto`:
        free text, but from the moment the model writes `<tool_call>` the call must be one of
        the tools with arguments by its schema (a lazy trigger, as llguidance's structural
        tags: the text before it is free, the model decides whether to call); optional, so an
        engine that cannot constrain output (and the vLLM engine) serves `auto` unconstrained."""
        if not self.active:
            return None
        functions = [t.function for t in self.tools or []]
        if isinstance(self.tool_choice, NamedToolChoice):
            functions = [f for f in functions if f.name == self.tool_choice.function.name]
        calls = [{"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
                  "properties": {"name": {"const": f.name}, "arguments": f.parameters}}
                 for f in functions]  # fmt: skip
        schema = {"anyOf": calls, "x-guidance": CALL_JSON} if len(calls) > 1 else {
            **calls[0], "x-guidance": CALL_JSON}
        body = f'"\\n" %json {json.dumps(schema)} "\\n</tool_call>"'
        if self.tool_choice in (None, "auto"):
            lark = ("%llguidance {}\n"
                    f'start: call{"*" if self.parallel_tool_calls else "?"} tail\n'
                    "tail: TEXT\n"
                    "TEXT: /(.|\\n)*/\n"
                    'opening[lazy]: TEXT "<tool_call>"\n'
                    f"call: opening {body}\n")  # fmt: skip
            return OutputConstraint("lark", lark, optional=True)
        many = self.parallel_tool_calls and not isinstance(self.tool_choice, NamedToolChoice)
        lark = f'start: call{"+" if many else ""}\ncall: "<tool_call>" {body}\n'
        return OutputConstraint("lark", lark)


def parse_tool_calls(text: str) -> tuple[str | None, list[dict]]:
    """(content without the calls or None, tool calls in OpenAI's shape) from model output.
    A `<tool_call>` whose body is not a JSON object with a name stays in the content."""
    calls, kept, last = [], [], 0
    for match in TOOL_CALL.finditer(text):
        try:
            body = json.loads(match.group(1))
        except json.JSONDecodeError:
            continue
        if not isinstance(body, dict) or not isinstance(body.get("name"), str):
            continue
        kept.append(text[last : match.start()])
        last = match.end()
        calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": {
            "name": body["name"], "arguments": json.dumps(body.get("arguments", {}))}})
    kept.append(text[last:])
    content = "".join(kept).strip() if calls else text
    return content or None, calls


class ToolCallStream:
    """Streams one choice of a tool-enabled chat: text before a possible `<tool_call>` goes out
    as content at once; from the first `<` that may open a call it is held, and parsed into
    tool-call deltas (`index`, `id`, `function` with name and arguments) when the choice ends."""

    def __init__(self) -> None:
        self.text = ""
        self.sent = 0
        self.calls: list[dict] = []

    def delta(self, new_text: str, finished: bool) -> dict:
        self.text += new_text
        if not finished:
            hold = self.text.find(TOOL_CALL_OPEN, self.sent)
            if hold < 0:
                hold = _partial_open(self.text, self.sent)
            end = len(self.text) if hold < 0 else hold
            out, self.sent = self.text[self.sent : end], max(self.sent, end)
            return {"content": out}
        content, self.calls = parse_tool_calls(self.text[self.sent :])
        delta: dict[str, Any] = {"content": content or ""} if content or not self.calls else {}
        if self.calls:
            delta["tool_calls"] = [{"index": i, **c} for i, c in enumerate(self.calls)]
        self.sent = len(self.text)
        return delta


def _partial_open(text: str, start: int) -> int:
    """Where a suffix of text[start:] that could begin `<tool_call>` starts, or -1."""
    for k in range(min(len(TOOL_CALL_OPEN) - 1, len(text) - start), 0, -1):
        if text.endswith(TOOL_CALL_OPEN[:k]):
            return len(text) - k
    return -1
