"""A chat choice's output text as OpenAI message fields: Qwen3-style `<think>...</think>`
reasoning into `reasoning_content`, `<tool_call>` blocks into `tool_calls`, the rest `content`;
for a whole text or streamed as deltas.

Reasoning is parsed for a model whose chat template mentions `<think>` (Qwen3 and its kin):
text that starts with `<think>` is reasoning up to `</think>`; a text that ends inside it (the
budget ran out) is all reasoning.
"""

from __future__ import annotations

from typing import Any

from models.openai.tools import ToolCallStream, parse_tool_calls

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def reasons(tokenizer: Any) -> bool:
    """Whether the model's chat template speaks `<think>` (its output is parsed for it)."""
    template = getattr(tokenizer, "chat_template", None)
    return isinstance(template, str) and THINK_OPEN in template


def split_reasoning(text: str) -> tuple[str | None, str]:
    """(reasoning or None, content) of a text that may open with `<think>`."""
    if not text.lstrip().startswith(THINK_OPEN):
        return None, text
    body = text.lstrip()[len(THINK_OPEN) :]
    reasoning, closed, content = body.partition(THINK_CLOSE)
    return reasoning.strip(), content.lstrip() if closed else ""


def message_fields(text: str, reasoning: bool, tools: bool) -> dict:
    """content / reasoning_content / tool_calls of a finished choice."""
    thought, content = split_reasoning(text) if reasoning else (None, text)
    fields: dict[str, Any] = {"content": content, "reasoning_content": thought}
    if tools:
        fields["content"], calls = parse_tool_calls(content)
        fields["tool_calls"] = calls or None
    return fields


class ChoiceStream:
    """One streamed choice: reasoning deltas while inside `<think>`, then content (through a
    ToolCallStream when tools are offered)."""

    def __init__(self, reasoning: bool, tools: bool):
        self.pending = "" if reasoning else None  # text not yet sorted into reasoning / content
        self.thinking = False
        self.tools = ToolCallStream() if tools else None

    @property
    def calls(self) -> list[dict]:
        return self.tools.calls if self.tools else []

    def delta(self, text: str, finished: bool) -> dict:
        reasoning, content = self._split(text, finished)
        delta = self.tools.delta(content, finished) if self.tools else {"content": content}
        if reasoning:
            delta["reasoning_content"] = reasoning
        return delta

    def _split(self, text: str, finished: bool) -> tuple[str, str]:
        if self.pending is None:
            return "", text
        self.pending += text
        if not self.thinking:
            head = self.pending.lstrip()
            if head.startswith(THINK_OPEN):
                self.thinking, self.pending = True, head[len(THINK_OPEN) :]
            elif finished or not THINK_OPEN.startswith(head):
                out, self.pending = self.pending, None
                return "", out
            else:
                return "", ""
        reasoning, closed, rest = self.pending.partition(THINK_CLOSE)
        if closed:
            self.pending = None
            return reasoning, rest.lstrip()
        keep = 0 if finished else next((k for k in range(len(THINK_CLOSE) - 1, 0, -1)
                                        if reasoning.endswith(THINK_CLOSE[:k])), 0)  # fmt: skip
        self.pending = reasoning[len(reasoning) - keep :]
        return reasoning[: len(reasoning) - keep], ""
