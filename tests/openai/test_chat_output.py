"""Reasoning and tool-call parsing of chat output: whole texts, and streamed in every split
into pieces (the deltas must add up to the whole-text fields)."""

from __future__ import annotations

import json

import pytest

from models.openai.chat_output import ChoiceStream, message_fields

CALL = '<tool_call>\n{"name": "find_person", "arguments": {"who": "Mia"}}\n</tool_call>'
CASES = [
    ("<think>\nMia was seen in the park.\n</think>\n\nShe is in the park.", True, False,
     "Mia was seen in the park.", "She is in the park.", []),
    ("<think>still thinking", True, False, "still thinking", "", []),
    ("No thoughts. <think> is text here", True, False, None, "No thoughts. <think> is text here", []),
    (f"<think>I should look.</think>\n{CALL}", True, True, "I should look.", None, ["find_person"]),
    (f"Let me check.\n{CALL}", False, True, None, "Let me check.", ["find_person"]),
    ("<tool_call>not json</tool_call>", False, True, None, "<tool_call>not json</tool_call>", []),
]  # fmt: skip


@pytest.mark.parametrize("text, reasoning, tools, thought, content, names", CASES)
def test_whole_text_and_every_streamed_split_agree(text, reasoning, tools, thought, content, names):
    fields = message_fields(text, reasoning, tools)
    assert fields["reasoning_content"] == thought and fields["content"] == content
    assert [c["function"]["name"] for c in fields.get("tool_calls") or []] == names
    for step in (1, 3, 7):
        stream = ChoiceStream(reasoning, tools)
        pieces = [text[i : i + step] for i in range(0, len(text), step)]
        deltas = [stream.delta(p, i == len(pieces) - 1) for i, p in enumerate(pieces)]
        streamed_thought = "".join(d.get("reasoning_content", "") for d in deltas)
        streamed_content = "".join(d.get("content") or "" for d in deltas)
        assert streamed_thought.strip() == (thought or "")
        assert streamed_content.strip() == (content or "")
        calls = [c for d in deltas for c in d.get("tool_calls", [])]
        assert [c["function"]["name"] for c in calls] == names
        assert all(json.loads(c["function"]["arguments"]) == {"who": "Mia"} for c in calls)
