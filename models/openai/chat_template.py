"""Chat messages to prompt token ids, tool definitions and tool history included.

A tokenizer whose chat template knows tools (Qwen2.5 / Qwen3 and other Hermes-style templates)
gets the messages and `tools` as they are. A template that renders only {role, content} (the
built-in toy tokenizer's) gets the same conversation written the Hermes way first: the tool
list in the system message, assistant calls as `<tool_call>` blocks, tool results as
`<tool_response>` blocks in a user turn. History is never dropped.
"""

from __future__ import annotations

import json
from typing import Any

TOOLS_PREAMBLE = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
    "{tools}\n</tools>\n\nFor each function call, return a json object with function name and "
    "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
)


def knows_tools(tokenizer: Any) -> bool:
    template = getattr(tokenizer, "chat_template", None) or ""
    return isinstance(template, str) and "tools" in template and "tool_call" in template


def _call_text(call: dict) -> str:
    fn = call["function"]
    try:
        args = json.loads(fn["arguments"])
    except (TypeError, json.JSONDecodeError):
        args = fn["arguments"]
    return "<tool_call>\n" + json.dumps({"name": fn["name"], "arguments": args}) + "\n</tool_call>"


def hermes_messages(messages: list[dict], tools: list[dict] | None) -> list[dict]:
    """The conversation as plain {role, content} messages in the Hermes tool format."""
    out: list[dict] = []
    if tools:
        preamble = TOOLS_PREAMBLE.format(tools="\n".join(json.dumps(t) for t in tools))
        if messages and messages[0]["role"] == "system":
            out.append({"role": "system", "content": messages[0]["content"] + "\n\n" + preamble})
            messages = messages[1:]
        else:
            out.append({"role": "system", "content": preamble})
    for m in messages:
        if m["role"] == "assistant" and m.get("tool_calls"):
            parts = [m["content"]] if m["content"] else []
            parts += [_call_text(c) for c in m["tool_calls"]]
            out.append({"role": "assistant", "content": "\n".join(parts)})
        elif m["role"] == "tool":
            block = f"<tool_response>\n{m['content']}\n</tool_response>"
            if out and out[-1].get("tool_results"):  # consecutive results share one user turn
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "tool_results": True})
        else:
            out.append({"role": m["role"], "content": m["content"]})
    return [{"role": m["role"], "content": m["content"]} for m in out]


def chat_prompt_ids(tokenizer: Any, messages: list[dict], tools: list[dict] | None,
                    context: str) -> list[int]:  # fmt: skip
    """Prompt ids of a chat; `context` (retrieved sources) leads as a system message."""
    if context:
        messages = [{"role": "system", "content": context}, *messages]
    if knows_tools(tokenizer):
        for m in messages:
            for call in m.get("tool_calls") or []:
                fn = call["function"]
                try:
                    fn["arguments"] = json.loads(fn["arguments"])
                except (TypeError, json.JSONDecodeError):
                    pass
        ids = tokenizer.apply_chat_template(messages, tools=tools or None,
                                            add_generation_prompt=True, tokenize=True)  # fmt: skip
    else:
        ids = tokenizer.apply_chat_template(hermes_messages(messages, tools),
                                            add_generation_prompt=True, tokenize=True)  # fmt: skip
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return list(ids)
