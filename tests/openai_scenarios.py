"""Client scenarios the Serve tests run against more than one engine (torch in tests/serve,
vLLM in tests/engines_vllm), so each engine is held to the same assertions."""

from __future__ import annotations

import json


def structured_output_and_a_forced_tool_call(client, model: str) -> list[dict]:
    """A parsed pydantic response_format and a named tool call streamed with valid arguments
    for its schema; returns the messages it asked with."""
    from pydantic import BaseModel, Field

    class Place(BaseModel):
        who: str = Field(max_length=12)
        where: str = Field(max_length=12)

    messages = [{"role": "user", "content": "Where is Mia?"}]
    r = client.chat.completions.parse(model=model, messages=messages, response_format=Place,
                                      max_tokens=48, temperature=1.0, seed=1)
    assert isinstance(r.choices[0].message.parsed, Place)
    tool = {"type": "function", "function": {"name": "find_person", "parameters": {
        "type": "object", "properties": {"who": {"enum": ["Mia", "Tom"]}}, "required": ["who"]}}}
    stream = client.chat.completions.create(
        model=model, messages=messages, tools=[tool], max_tokens=96, stream=True,
        tool_choice={"type": "function", "function": {"name": "find_person"}})  # fmt: skip
    calls = [tc for c in stream if c.choices for tc in c.choices[0].delta.tool_calls or []]
    assert calls[0].function.name == "find_person"
    assert json.loads(calls[0].function.arguments)["who"] in ("Mia", "Tom")
    return messages
