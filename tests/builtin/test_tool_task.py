"""The find_person tool task trains on exactly the prompt the serving layer builds for the same
chat request (tools offered, tool calls and results in the history), and its answers are what
the serving layer parses back into tool_calls."""

from __future__ import annotations

import json
import random

from models.builtin import world
from models.builtin.tool_task import ARGUMENT_NAMES, EVAL_MAX_TOKENS, call_text, find_person_tool
from models.builtin.train import ChatEncoder
from models.openai.chat_template import chat_prompt_ids, hermes_messages
from models.openai.tools import parse_tool_calls


def test_training_prompts_are_the_serving_prompts_and_calls_parse():
    enc, rng = ChatEncoder(), random.Random(5)
    tool, arg = find_person_tool(rng)
    call = {"id": "call_1", "type": "function",
            "function": {"name": "find_person", "arguments": json.dumps({arg: "Mia"})}}  # fmt: skip
    for history in ([{"role": "user", "content": "Where is Mia?"}],
                    [{"role": "user", "content": "Where is Mia?"},
                     {"role": "assistant", "content": "", "tool_calls": [call]},
                     {"role": "tool", "tool_call_id": "call_1", "content": "the park"}]):  # fmt: skip
        ids, mask = enc.chat(hermes_messages(history, [tool]), "Mia is in the park.")
        served = chat_prompt_ids(enc.tok, [dict(m) for m in history], [tool], "")
        assert ids[: mask.index(1)] == served
    content, calls = parse_tool_calls(call_text("Mia", arg))
    assert content is None and calls[0]["function"]["name"] == "find_person"
    assert json.loads(calls[0]["function"]["arguments"]) == {arg: "Mia"}


def test_the_evaluation_gives_every_answer_room_to_finish():
    """The held-out check generates at most EVAL_MAX_TOKENS: the longest answer (a call with
    the longest person and argument names) must fit, or a perfect model would score 0."""
    enc = ChatEncoder()
    longest = max((call_text(p, a) for p in world.PEOPLE for a in ARGUMENT_NAMES),
                  key=lambda text: len(enc.tok(text)["input_ids"]))  # fmt: skip
    assert len(enc.tok(longest)["input_ids"]) + 1 <= EVAL_MAX_TOKENS  # the answer and EOS
