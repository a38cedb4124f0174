"""Structured output and tools through the official openai SDK, in-process: the SDK talks to
the real serving layer over the real torch engine (built-in toy model). The HTTP hop is an
httpx MockTransport that hands the body to OpenAIServing.chat (plumbing only; the Ray Serve
path is covered in tests/serve/test_app.py)."""

from __future__ import annotations

import asyncio
import json
import random

import httpx
import openai
import pytest
from pydantic import BaseModel, Field

from models.builtin import resolve_source
from models.builtin.world import sample_task_prompt
from models.engine import build_engine
from models.engine.config import EngineConfig
from models.openai.errors import OpenAIError
from models.openai.serving import Backends, OpenAIServing, ServingLimits


class Person(BaseModel):
    name: str = Field(max_length=16)  # the toy model writes stories into an unbounded string
    place: str
    happy: bool
    age: int


FIND_PERSON = {"type": "function", "function": {
    "name": "find_person", "description": "Where a person of the toy world is.",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["who"],
                   "properties": {"who": {"type": "string", "enum": ["Mia", "Tom", "Ava"]}}}}}


@pytest.fixture(scope="module")
def eng():
    return build_engine(EngineConfig(kv_cache_cpu_gib=0.1), resolve_source("builtin:toy").big)


@pytest.fixture(scope="module")
def serving(eng):
    return OpenAIServing(
        model_name="tandem", tokenizer=eng.tokenizer, backends=Backends(generate=eng.generate),
        limits=ServingLimits(max_model_len=1024, vocab_size=len(eng.tokenizer), max_n=64))


def sdk(serving) -> openai.AsyncOpenAI:
    async def handle(request: httpx.Request) -> httpx.Response:
        try:
            result = await serving.chat(json.loads(request.content))
        except OpenAIError as exc:
            return httpx.Response(exc.status_code, json=exc.to_dict())
        if isinstance(result, dict):
            return httpx.Response(200, json=result)
        body = "".join([line async for line in result]).encode()
        return httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})

    http = httpx.AsyncClient(transport=httpx.MockTransport(handle))
    return openai.AsyncOpenAI(base_url="http://tandem/v1", api_key="x", http_client=http,
                              max_retries=0)


def prompts(n: int) -> list[str]:
    rng = random.Random(0)
    return [sample_task_prompt(rng.choice(["qa", "rewrite", "list"]), rng)[0] for _ in range(n)]


def test_parse_gives_a_valid_object_for_50_sampled_prompts(serving):
    client = sdk(serving)

    async def one(prompt: str, seed: int):
        return await client.chat.completions.parse(
            model="tandem", messages=[{"role": "user", "content": prompt}], response_format=Person,
            temperature=1.0, max_tokens=64, seed=seed)

    async def all_of():
        return await asyncio.gather(*(one(p, i) for i, p in enumerate(prompts(50))))

    results = asyncio.run(all_of())
    parsed = [r.choices[0].message.parsed for r in results]
    assert all(isinstance(p, Person) for p in parsed)
    assert len({p.model_dump_json() for p in parsed}) > 10  # sampled, not one forced answer


def test_json_object_always_parses(serving):
    client = sdk(serving)

    async def all_of():
        return await asyncio.gather(*(client.chat.completions.create(
            model="tandem", messages=[{"role": "user", "content": p}], temperature=1.0, seed=i,
            max_tokens=48, response_format={"type": "json_object"}) for i, p in enumerate(prompts(12))))

    for r in asyncio.run(all_of()):
        assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_required_and_named_tool_calls_have_valid_arguments(serving):
    client = sdk(serving)
    messages = [{"role": "user", "content": "Where is Mia?"}]

    async def calls():
        named = await client.chat.completions.create(
            model="tandem", messages=messages, tools=[FIND_PERSON], max_tokens=64,
            tool_choice={"type": "function", "function": {"name": "find_person"}})
        required = await client.chat.completions.create(
            model="tandem", messages=messages, tools=[FIND_PERSON], max_tokens=128,
            tool_choice="required", parallel_tool_calls=False, temperature=1.0, seed=3)
        stream = await client.chat.completions.create(
            model="tandem", messages=messages, tools=[FIND_PERSON], max_tokens=64,
            tool_choice="required", parallel_tool_calls=False, stream=True)
        deltas = [c.choices[0].delta async for c in stream if c.choices]
        return named, required, deltas

    named, required, deltas = asyncio.run(calls())
    for r in (named, required):
        assert r.choices[0].finish_reason == "tool_calls"
        call = r.choices[0].message.tool_calls[0]
        assert call.function.name == "find_person"
        assert json.loads(call.function.arguments)["who"] in ("Mia", "Tom", "Ava")
    streamed = [tc for d in deltas for tc in d.tool_calls or []]
    assert streamed and streamed[0].function.name == "find_person"
    assert json.loads(streamed[0].function.arguments)["who"] in ("Mia", "Tom", "Ava")


def test_auto_leaves_free_text_alone_and_holds_a_started_call_to_the_schema(eng):
    """tool_choice auto: the grammar is optional and lazy. A reply without a call comes out
    token for token as it does unconstrained (to its last token: free text is not closed
    early near max_tokens); once `<tool_call>` is written, only a call of an offered tool with
    arguments valid for its schema may follow."""
    from models.openai.chat_template import chat_prompt_ids
    from models.openai.protocol import ChatCompletionRequest
    from models.protocol.requests import GenerationRequest, SamplingParams
    from models.structured.llguidance_compiler import LLGuidanceCompiler

    messages = [{"role": "user", "content": "Tell me a story about Tom."}]
    body = {"model": "tandem", "messages": messages, "tools": [FIND_PERSON]}
    auto = ChatCompletionRequest.model_validate(body).constraint()
    assert auto is not None and auto.optional
    ids = chat_prompt_ids(eng.tokenizer, messages, [FIND_PERSON], "")

    async def tokens(constraint) -> list[int]:
        request = GenerationRequest(f"auto-{constraint is None}", list(ids),
                                    SamplingParams(max_tokens=40, temperature=0),
                                    constraint=constraint)  # fmt: skip
        return [t async for out in eng.generate(request) for t in out.token_ids]

    free, guarded = asyncio.run(tokens(None)), asyncio.run(tokens(auto))
    assert len(free) == 40 and guarded == free
    assert "<tool_call>" not in eng.tokenizer.decode(free)

    matcher = LLGuidanceCompiler(eng.tokenizer, len(eng.tokenizer), set()).matcher(auto)

    def feed(text: str) -> bool:
        return matcher.consume(eng.tokenizer.encode(text, add_special_tokens=False))

    assert feed("Let me look that up.\n<tool_call>\n")  # free text, then a call begins
    assert not feed('{"name": "find_person", "arguments": {"who": "Bob"}}')  # not in its enum
    matcher = LLGuidanceCompiler(eng.tokenizer, len(eng.tokenizer), set()).matcher(auto)
    assert feed('<tool_call>\n{"name": "find_person", "arguments": {"who": "Mia"}}\n</tool_call>')
    assert not feed('<tool_call>\n{"name": "lookup"')  # a second call names an offered tool too


def test_the_tools_adapter_calls_when_asked_where_someone_is(eng):
    """The shipped `tools` adapter with tool_choice auto (the default when tools are sent):
    asked where someone is, it calls find_person with that person; asked for a story, it
    answers without a call."""
    from models.builtin import resolve_adapter

    asyncio.run(eng.load_adapter("tools", resolve_adapter("builtin:tools",
                                                          resolve_source("builtin:toy"))))

    async def adapters() -> list[str]:
        return ["tools"]

    client = sdk(OpenAIServing(
        model_name="tandem", tokenizer=eng.tokenizer,
        backends=Backends(generate=eng.generate, adapters=adapters),
        limits=ServingLimits(max_model_len=1024, vocab_size=len(eng.tokenizer))))  # fmt: skip
    tool = {"type": "function", "function": {"name": "find_person", "parameters": {
        "type": "object", "properties": {"who": {"type": "string"}}, "required": ["who"]}}}

    async def ask(content: str):
        return await client.chat.completions.create(
            model="tandem:tools", messages=[{"role": "user", "content": content}],
            tools=[tool], max_tokens=96, temperature=0)  # fmt: skip

    async def both():
        return await asyncio.gather(ask("Where is Tom?"), ask("Tell me a story about Mia."))

    where, story = asyncio.run(both())
    assert where.choices[0].finish_reason == "tool_calls", where.choices[0].message
    call = where.choices[0].message.tool_calls[0].function
    assert (call.name, json.loads(call.arguments)) == ("find_person", {"who": "Tom"})
    assert story.choices[0].message.tool_calls is None and story.choices[0].message.content


def test_tool_history_is_rendered_and_answered(serving):
    messages = [
        {"role": "user", "content": "Where is Mia?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function",
         "function": {"name": "find_person", "arguments": '{"who": "Mia"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "Mia is in the park."},
    ]
    from models.openai.chat_template import chat_prompt_ids

    ids = chat_prompt_ids(serving.tokenizer, messages, [FIND_PERSON], "")
    text = serving.tokenizer.decode(ids)
    assert '"name": "find_person"' in text and "<tool_response>\nMia is in the park." in text
    assert "<tools>" in text
    r = asyncio.run(sdk(serving).chat.completions.create(
        model="tandem", messages=messages, tools=[FIND_PERSON], max_tokens=16, temperature=0))
    assert r.choices[0].message.content or r.choices[0].message.tool_calls


@pytest.mark.parametrize("body, param", [
    ({"reasoning_effort": "high"}, "reasoning_effort"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}}, "response_format"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [FIND_PERSON], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
])  # fmt: skip
def test_what_cannot_be_honoured_is_a_400_naming_the_field(serving, body, param):
    base = {"model": "tandem", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    with pytest.raises(OpenAIError) as err:
        result = asyncio.run(serving.chat({**base, **body}))
        assert result is None
    assert err.value.status_code == 400 and param in (err.value.param or "") + err.value.message


def test_retrieve_model_gives_one_card_or_a_404(serving):
    assert asyncio.run(serving.retrieve_model("tandem:auto"))["parent"] == "tandem"
    with pytest.raises(OpenAIError) as err:
        asyncio.run(serving.retrieve_model("gpt-9"))
    assert err.value.status_code == 404


def test_tokenize_matches_the_chat_prompt_and_detokenize_inverts_it(serving):
    messages = [{"role": "user", "content": "Where is Mia?"}]
    t = asyncio.run(serving.tokenize({"model": "tandem", "messages": messages}))
    from models.openai.chat_template import chat_prompt_ids

    assert t["tokens"] == chat_prompt_ids(serving.tokenizer, messages, None, "")
    text = asyncio.run(serving.tokenize({"model": "tandem", "prompt": "Mia is in the park."}))
    back = asyncio.run(serving.detokenize({"model": "tandem", "tokens": text["tokens"]}))
    assert back["prompt"] == "Mia is in the park." and text["count"] == len(text["tokens"])
    with pytest.raises(OpenAIError) as err:
        asyncio.run(serving.detokenize({"model": "tandem", "tokens": [10**9]}))
    assert err.value.status_code == 400
