"""The toy world's tool-use task: a `find_person` tool, so that `tool_choice: "auto"` means
something on the built-in model, through the shipped `tools` LoRA adapter trained on it
(`main`; 400 steps x 16 on two CPU cores, 775 s, loss 7.9 -> 1.39). Asked where someone is, it
calls find_person with that person in 48 of 48 held-out cases as served (`evaluate_served`:
Tandem's engine with `auto`'s lazy call grammar, which holds a call the model begins to the
tool's schema), 32 % without the grammar (`evaluate`: free generation names the argument as it
likes, `name` for a schema's `who`); given a tool result it answers from it (89 %); asked for
a story it writes one without a call (100 %). The toy tokenizer spells a call's JSON out one
character at a time (~60 tokens), characters the base model never saw in pretraining: an
earlier run on compact JSON (the grammar's old separators) never wrote a valid call.

Conversations are rendered as the serving layer renders them for the toy tokenizer (Hermes
style, models/openai/chat_template.hermes_messages): the tool list in the system message, calls
as `<tool_call>` blocks, results as `<tool_response>` turns. Three kinds, all with the tool
offered: asked where someone is, the model calls `find_person` with the person's name under the
argument the tool's schema names; given the tool's result, it answers from it ("Mia is in the
park."); asked anything else (a story), it answers without a call.
"""

from __future__ import annotations

import json
import random

from models.builtin import world
from models.openai.chat_template import hermes_messages

WHERE_PHRASINGS = ["Where is {p}?", "Where can I find {p}?", "Do you know where {p} is?",
                   "Find {p} for me.", "Where is {p} right now?", "Which place is {p} in?"]  # fmt: skip
ARGUMENT_NAMES = ["who", "name", "person"]
DESCRIPTIONS = [None, "Find where a person is.", "Look up the place of a person by name."]
EVAL_MAX_TOKENS = 96  # a call is about 60 of the toy tokenizer's tokens (JSON is spelled out)
RESULT_STYLES = ["{p} is in the {place}.", '{{"who": "{p}", "place": "{place}"}}', "the {place}"]


def find_person_tool(rng: random.Random) -> tuple[dict, str]:
    """A find_person tool as a client sends it, and the name of its one argument."""
    arg = rng.choice(ARGUMENT_NAMES)
    fn: dict = {"name": "find_person"}
    if (description := rng.choice(DESCRIPTIONS)) is not None:
        fn["description"] = description
    fn["parameters"] = {"type": "object", "properties": {arg: {"type": "string"}},
                        "required": [arg]}  # fmt: skip
    return {"type": "function", "function": fn}, arg


def call_text(person: str, arg: str) -> str:
    """The assistant turn that calls find_person (what chat_template writes for a call)."""
    body = {"name": "find_person", "arguments": {arg: person}}
    return "<tool_call>\n" + json.dumps(body) + "\n</tool_call>"


def tool_example(rng: random.Random) -> tuple[list[world.Message], str]:
    """(the conversation so far as plain chat messages, the assistant's answer)."""
    return tool_case(rng)[1:]


def tool_case(rng: random.Random) -> tuple[dict, list[world.Message], str]:
    """(the tool offered, the conversation so far as plain chat messages, the answer)."""
    tool, arg = find_person_tool(rng)
    person, place = rng.choice(world.PEOPLE), rng.choice(world.PLACES)
    ask = {"role": "user", "content": rng.choice(WHERE_PHRASINGS).format(p=person)}
    kind = rng.random()
    if kind < 0.4:
        return tool, hermes_messages([ask], [tool]), call_text(person, arg)
    if kind < 0.8:
        call = {"id": "call_1", "type": "function", "function": {
            "name": "find_person", "arguments": json.dumps({arg: person})}}
        result = rng.choice(RESULT_STYLES).format(p=person, place=place)
        history = [ask, {"role": "assistant", "content": "", "tool_calls": [call]},
                   {"role": "tool", "tool_call_id": "call_1", "content": result}]  # fmt: skip
        return tool, hermes_messages(history, [tool]), f"{person} is in the {place}."
    messages, answer = world.story_chat(rng, rng.random() < 0.5)
    return tool, hermes_messages(messages, [tool]), answer


def case_kind(messages: list[world.Message], answer: str) -> str:
    """ask (the answer is a call), result (answer from a tool's result) or story."""
    if answer.startswith("<tool_call>"):
        return "ask"
    return "result" if "<tool_response>" in messages[-1]["content"] else "story"


def tool_training_example(enc, rng: random.Random):
    """tool_example as token ids and loss mask (train.ChatEncoder)."""
    return enc.chat(*tool_example(rng))


def evaluate(model, tokenizer, n: int = 48, seed: int = 99) -> dict[str, float]:
    """Greedy answers to held-out conversations of each kind: the share that calls
    find_person with the right person (ask), answers with the result's place (result), or
    answers without a call (story)."""
    import torch

    rng, right, seen = random.Random(seed), {}, {}
    for _ in range(n):
        messages, answer = tool_example(rng)
        kind = case_kind(messages, answer)
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]  # fmt: skip
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=EVAL_MAX_TOKENS, do_sample=False)
        text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
        ok = (text == answer if kind != "story"
              else "<tool_call>" not in text and bool(text))  # fmt: skip
        seen[kind], right[kind] = seen.get(kind, 0) + 1, right.get(kind, 0) + ok
    return {k: round(right[k] / seen[k], 3) for k in sorted(seen)}


def evaluate_served(big: str, adapter: str, n: int = 48, seed: int = 99) -> dict[str, float]:
    """`evaluate` as a client gets it: Tandem's engine with the adapter loaded, greedy, and
    `tool_choice: auto`'s grammar (a call the model begins must be a valid find_person call).
    A call counts when it parses to find_person with the right person under the tool's
    argument name (parsed, not compared as text: the call's id and layout are not the point)."""
    from models.engine.config import EngineConfig
    from models.engine.llm_engine import LLMEngine
    from models.openai.tools import ChatTools, parse_tool_calls
    from models.protocol.requests import GenerationRequest, SamplingParams

    engine = LLMEngine(EngineConfig(device="cpu", kv_cache_cpu_gib=0.2), big)
    engine.adapters.load("tools", adapter)
    rng, cases = random.Random(seed), {}
    for i in range(n):
        tool, messages, answer = tool_case(rng)
        kind = case_kind(messages, answer)
        ids = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                   tokenize=True, return_dict=False)  # fmt: skip
        constraint = ChatTools.model_validate({"tools": [tool], "tool_choice": "auto"}).constraint()
        engine.add_request(GenerationRequest(f"t{i}", list(ids), SamplingParams(
            max_tokens=EVAL_MAX_TOKENS, temperature=0), adapter="tools", constraint=constraint))
        cases[f"t{i}"] = (kind, answer)
    texts = {rid: "" for rid in cases}
    while engine.has_unfinished():
        for out in engine.step():
            texts[out.request_id] += out.text
    right, seen = {}, {}
    for rid, (kind, answer) in cases.items():
        text = texts[rid].strip()
        if kind == "ask":
            _, calls = parse_tool_calls(text)
            want = json.loads(answer.removeprefix("<tool_call>").removesuffix("</tool_call>"))
            ok = len(calls) == 1 and calls[0]["function"]["name"] == "find_person" and (
                json.loads(calls[0]["function"]["arguments"]) == want["arguments"])
        elif kind == "result":
            ok = text == answer
        else:
            ok = "<tool_call>" not in text and bool(text)
        seen[kind], right[kind] = seen.get(kind, 0) + 1, right.get(kind, 0) + ok
    return {k: round(right[k] / seen[k], 3) for k in sorted(seen)}


def main() -> None:
    """Train the `tools` adapter on a trained big model and measure it:
    `python -m models.builtin.tool_task --init models/builtin/weights/toy --device cuda`
    (on two CPU cores one step of 16 conversations of ~450 tokens takes about 9 s of CPU)."""
    import argparse
    from pathlib import Path

    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer

    from models.builtin.train import Phase, load_base, train_lora

    parser = argparse.ArgumentParser(description=main.__doc__.splitlines()[0])
    parser.add_argument("--init", type=Path, required=True, help="A trained toy model dir.")
    parser.add_argument("--out", type=Path, default=None, help="Default: INIT/adapters/tools.")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workers", type=int, default=0, help="Data worker processes.")
    parser.add_argument("--eval-only", action="store_true", help="Measure OUT as it is.")
    args = parser.parse_args()
    out = args.out or args.init / "adapters" / "tools"
    device = torch.device(args.device)
    log = {} if args.eval_only else train_lora(
        load_base(args.init / "big").to(device), tool_training_example,
        Phase(args.steps, args.batch, 3e-3), args.rank, seed=40, device=device, out=out,
        workers=args.workers)  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(str(args.init / "big"))
    model = PeftModel.from_pretrained(load_base(args.init / "big"), str(out)).eval()
    log["held_out"] = evaluate(model, tokenizer)  # free generation (transformers)
    log["served"] = evaluate_served(str(args.init / "big"), str(out))  # with auto's grammar
    print(json.dumps(log))


if __name__ == "__main__":
    main()
