"""The Responses API's translation to chat and back, without a model: requests become the chat
request they mean (or a 400 naming the field), file citations land where the answer drew on a
source, and the events parse through the `openai` SDK's own stream accumulator. The end-to-end
path (the real app, the real model) is in tests/serve/test_app.py."""

from __future__ import annotations

import asyncio
import json

import openai
import pytest
from openai._models import construct_type
from openai.lib.streaming.responses._responses import ResponseStreamState
from openai.types.responses import Response
from openai.types.responses.response_stream_event import ResponseStreamEvent

from models.openai.citations import file_citations
from models.openai.errors import OpenAIError
from models.openai.protocol import parse_request
from models.openai.response_events import ResponseWriter
from models.openai.responses import ResponsesRequest, ResponsesServing

TOOL = {"type": "function", "name": "find_person",
        "parameters": {"type": "object", "properties": {"who": {"type": "string"}}}}  # fmt: skip


def chat_body(**body) -> dict:
    return parse_request(ResponsesRequest, {"model": "tandem", **body}).chat_body()


def test_input_items_become_the_chat_conversation():
    call = {"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "find_person",
            "arguments": '{"who": "Mia"}', "status": "completed"}  # fmt: skip
    body = chat_body(instructions="Be brief.", tools=[TOOL], tool_choice="auto", input=[
        {"role": "user", "content": [{"type": "input_text", "text": "Where is Mia?"}]},
        {"type": "file_search_call", "id": "fs_1", "status": "completed", "queries": []},
        call, {"type": "function_call_output", "call_id": "call_1", "output": "the bakery"}])
    assert body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Where is Mia?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function",
         "function": {"name": "find_person", "arguments": '{"who": "Mia"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "the bakery"}]  # fmt: skip
    assert body["tools"] == [{"type": "function", "function": {
        "name": "find_person", "parameters": TOOL["parameters"]}}]
    search = chat_body(input="Where is Mia?", max_output_tokens=9, tools=[{
        "type": "file_search", "vector_store_ids": ["vs_1"], "max_num_results": 3,
        "filters": {"type": "eq", "key": "k", "value": "v"},
        "ranking_options": {"score_threshold": 0.2}}], seed=4)
    assert search["rag"] == {"vector_store_ids": ["vs_1"], "top_k": 3, "score_threshold": 0.2,
                             "filters": {"type": "eq", "key": "k", "value": "v"}}  # fmt: skip
    assert search["max_completion_tokens"] == 9 and search["seed"] == 4
    fmt = chat_body(input="x", text={"format": {"type": "json_schema", "name": "p",
                                                "schema": {"type": "object"}}})  # fmt: skip
    assert fmt["response_format"] == {"type": "json_schema",
                                      "json_schema": {"name": "p", "schema": {"type": "object"}}}


@pytest.mark.parametrize("body, param", [
    ({"store": True}, "store"),
    ({"previous_response_id": "resp_1"}, "previous_response_id"),
    ({"frobnicate": 1}, "frobnicate"),
    ({"reasoning": {"effort": "low"}}, "reasoning"),
    ({"include": ["message.output_text.logprobs"]}, "include[0]"),
    ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"tools": [{"type": "file_search"}]}, "tools[0].vector_store_ids"),
    ({"input": [{"type": "computer_call_output", "call_id": "c"}]}, "input[0].type"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
     "input[0].content[0]"),
    ({"tool_choice": {"type": "allowed_tools", "tools": []}}, "tool_choice"),
])  # fmt: skip
def test_what_cannot_be_honoured_is_a_400_naming_it(body, param):
    serving = ResponsesServing(serving=None)  # refused before any chat call
    with pytest.raises(OpenAIError) as err:
        asyncio.run(serving.create({"model": "tandem", "input": "hi", **body}))
    assert err.value.status_code == 400 and err.value.param == param


def test_citations_follow_markers_or_the_source_a_sentence_draws_on():
    sources = [{"file_id": "file-a", "filename": "a.txt", "text": "Mia is in the bakery."},
               {"file_id": "file-b", "filename": "b.txt", "text": "Ivy is in the park."}]  # fmt: skip
    marked = file_citations("Ivy plays [2]. Mia bakes [1].", sources)
    assert [(c["file_id"], c["index"]) for c in marked] == [("file-b", 10), ("file-a", 25)]
    plain = file_citations("Ivy is in the park. The moon is green.", sources)
    assert plain == [{"type": "file_citation", "index": 19, "file_id": "file-b",
                      "filename": "b.txt"}]  # fmt: skip
    assert file_citations("Nothing here.", sources) == [] == file_citations("Mia.", [])


async def fake_chat_stream():
    """Chat SSE lines as OpenAIServing writes them (a stand-in for the engine: plumbing only)."""
    chunks = [
        {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}],
         "tandem": {"sources": [{"file_id": "file-a", "filename": "a.txt", "score": 0.8,
                                 "text": "Mia is in the bakery."}]}},
        {"choices": [{"index": 0, "delta": {"content": "", "reasoning_content": "Look it up."}}]},
        {"choices": [{"index": 0, "delta": {"content": "Mia is "}}]},
        {"choices": [{"index": 0, "delta": {"content": "in the bakery."}}]},
        {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "id": "call_9",
         "type": "function", "function": {"name": "find_person", "arguments": "{}"}}]},
         "finish_reason": "tool_calls"}], "tandem": {"sources": [], "interventions": []}},
        {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12}},
    ]  # fmt: skip
    for chunk in chunks:
        yield f"data: {json.dumps(chunk)}\n\n"
    yield "data: [DONE]\n\n"


def sdk_events(lines: list[str], state: ResponseStreamState) -> list:
    """The events as the SDK's `responses.stream` hands them to a client."""
    out = []
    for line in lines:
        data = json.loads(line.split("\n")[1].removeprefix("data: "))
        out += state.handle_event(construct_type(type_=ResponseStreamEvent, value=data))
    return out


def test_stream_events_parse_through_the_sdk_into_the_response():
    writer = ResponseWriter({"model": "tandem", "tools": [TOOL]}, True, True, "Where is Mia?")

    async def collect() -> list[str]:
        return [e async for e in writer.events(fake_chat_stream())]

    lines = asyncio.run(collect())
    state = ResponseStreamState(input_tools=[TOOL], text_format=openai.omit)
    events = sdk_events(lines, state)
    assert [e.sequence_number for e in events] == list(range(len(events)))
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] == "response.completed" and "response.output_text.annotation.added" in kinds
    response = events[-1].response
    assert [o.type for o in response.output] == ["file_search_call", "reasoning", "message",
                                                 "function_call"]  # fmt: skip
    assert response.output[0].results[0].filename == "a.txt"
    assert response.output_text == "Mia is in the bakery."
    assert response.output[2].content[0].annotations[0].file_id == "file-a"
    assert response.output[3].name == "find_person" and response.output[3].call_id == "call_9"
    assert (response.usage.input_tokens, response.usage.output_tokens) == (7, 5)


def test_a_failed_stream_ends_with_an_error_and_response_failed():
    async def failing():
        yield 'data: {"choices": [{"index": 0, "delta": {"content": "Mia"}}]}\n\n'
        yield 'data: {"error": {"message": "replica died", "code": "engine_dead"}}\n\n'

    async def collect() -> list[str]:
        return [e async for e in ResponseWriter({"model": "tandem"}, False, False).events(failing())]

    events = sdk_events(asyncio.run(collect()), ResponseStreamState(input_tools=[],
                                                                     text_format=openai.omit))
    assert [e.type for e in events[-2:]] == ["error", "response.failed"]
    assert events[-1].response.error.message == "replica died"


def test_a_plain_answer_is_the_object_the_sdk_parses():
    answer = {"choices": [{"index": 0, "finish_reason": "length", "message": {
        "role": "assistant", "content": "Mia is in", "tool_calls": None}}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 4}, "tandem": {"sources": []}}  # fmt: skip
    response = Response.model_validate(ResponseWriter({"model": "tandem"}, False, False)
                                       .from_chat(answer))  # fmt: skip
    assert response.status == "incomplete" and response.output_text == "Mia is in"
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.usage.total_tokens == 7 and response.output[0].status == "incomplete"


@pytest.mark.parametrize("body, param", [
    ({"text": {"verbosity": "low"}}, "text"),
    ({"text": {"format": "json"}}, "text"),
    ({"stream_options": {"include_obfuscation": True}}, "stream_options"),
    ({"tools": [{"type": "file_search", "vector_store_ids": ["v"], "ranking_options": [1]}]},
     "tools[0].ranking_options"),
])  # fmt: skip
def test_malformed_options_are_400s_not_crashes(body, param):
    """Each a 400 naming its field, as the refusals above."""
    test_what_cannot_be_honoured_is_a_400_naming_it(body, param)
    chat_body(input="hi", stream_options={"include_obfuscation": False})  # false is honoured


def test_file_search_without_retrieval_is_a_400_not_silence():
    from types import SimpleNamespace

    serving = ResponsesServing(SimpleNamespace(backends=SimpleNamespace(search=None)))
    with pytest.raises(OpenAIError) as err:
        asyncio.run(serving.create({"model": "tandem", "input": "hi", "tools": [
            {"type": "file_search", "vector_store_ids": ["vs_1"]}]}))
    assert err.value.code == "retrieval_disabled" and err.value.param == "tools"
