"""POST /tokenize and /detokenize in vLLM's shapes: a prompt or chat messages to token ids (as
the chat route would build them, tool definitions included), and token ids back to text."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from models.openai.chat_template import chat_prompt_ids
from models.openai.errors import OpenAIError
from models.openai.protocol import ChatMessage, parse_request
from models.openai.tools import ToolDefinition


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1)
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    tools: list[ToolDefinition] | None = None
    add_special_tokens: bool = True

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("send exactly one of prompt and messages")
        return self


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1)
    tokens: list[int]


def _check_model(model: str, served: str) -> None:
    if model.partition(":")[0] != served:
        raise OpenAIError(f"model '{model}' does not exist; available: {served}", 404,
                          param="model", code="model_not_found")  # fmt: skip


def tokenize(tokenizer: Any, served: str, max_model_len: int, body: Any) -> dict:
    req = parse_request(TokenizeRequest, body)
    _check_model(req.model, served)
    if req.messages is not None:
        tools = [t.model_dump(exclude_none=True) for t in req.tools or []] or None
        ids = chat_prompt_ids(tokenizer, [m.as_dict() for m in req.messages], tools, "")
    else:
        ids = tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens)
    return {"tokens": list(ids), "count": len(ids), "max_model_len": max_model_len}


def detokenize(tokenizer: Any, served: str, vocab_size: int, body: Any) -> dict:
    req = parse_request(DetokenizeRequest, body)
    _check_model(req.model, served)
    if any(not 0 <= t < vocab_size for t in req.tokens):
        raise OpenAIError(f"token ids must lie in [0, {vocab_size})", param="tokens")
    return {"prompt": tokenizer.decode(req.tokens)}
