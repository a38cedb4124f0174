"""OpenAI request and response types: the one place the API's shapes are written down.

Requests are pydantic models that accept unknown fields (the official SDK sends fields we don't
use), but keep them in `model_extra` so the serving layer can name them in a warning instead of
dropping them silently. Tandem's extensions travel in the body (`extra_body` in the SDK): `rag`,
`steering`, `adapter`.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from models.openai.errors import OpenAIError
from models.protocol.requests import SteerVectorSpec
from models.protocol.steering import SteeringMode, SteeringRequest

MAX_STOP_SEQUENCES = 4
MAX_TOP_LOGPROBS = 20


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False


class RagOptions(BaseModel):
    """`rag` in a request: search these vector stores and put the top chunks into the prompt."""

    model_config = ConfigDict(extra="forbid")

    vector_store_ids: list[str] = Field(default_factory=list)
    top_k: int | None = Field(None, ge=1, le=50)
    score_threshold: float | None = Field(None, ge=-1, le=1)


class SteeringVectorRef(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    coeff: float = Field(1.0, ge=-100, le=100)
    layers: list[int] | None = None


class SteeringOptions(BaseModel):
    """`steering` in a request: static vectors and/or a policy with its parameters and mode."""

    model_config = ConfigDict(extra="forbid")

    vectors: list[SteeringVectorRef] = Field(default_factory=list)
    policy: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    mode: SteeringMode | None = None
    every: int = Field(1, ge=1, le=1024)

    def vector_specs(self) -> list[SteerVectorSpec]:
        """The static vectors, as the engine takes them."""
        return [SteerVectorSpec(v.name, v.coeff, v.layers) for v in self.vectors]

    def to_request(
        self, policies: dict[str, dict[str, Any]], default_mode: SteeringMode, timeout_s: float
    ) -> SteeringRequest | None:
        """The policy part, typed once for the engine: None without a policy; 404 for a policy
        the config does not have. policies: name -> the config's default params."""
        if self.policy is None:
            return None
        if self.policy not in policies:
            raise OpenAIError(
                f"steering policy '{self.policy}' does not exist; available: "
                f"{', '.join(policies) or 'none'}",
                404, param="steering.policy", code="policy_not_found",
            )
        return SteeringRequest(
            policy=self.policy,
            params={**policies[self.policy], **self.params},
            mode=self.mode or default_mode,
            every=self.every,
            timeout_s=timeout_s,
        )


class SamplingFields(BaseModel):
    """Fields shared by chat and text completions."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    logit_bias: dict[str, float] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    ignore_eos: bool = False
    rag: RagOptions | None = None
    steering: SteeringOptions | None = None
    adapter: str | None = None

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, v):
        if v is None:
            return v
        stops = [v] if isinstance(v, str) else v
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed")
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must not be empty")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _check_bias(cls, v):
        if v is None:
            return v
        for key, bias in v.items():
            if not key.lstrip("-").isdigit():
                raise ValueError(f"logit_bias keys must be token ids, got {key!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"logit_bias values must be within [-100, 100], got {bias}")
        return v

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def unknown_fields(self) -> list[str]:
        return sorted((self.model_extra or {}).keys())


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None

    def text(self) -> str:
        """The message's text; content parts of type text are joined, others refused."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        texts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError(
                    f"content part of type {part.get('type')!r} is not supported; only text parts"
                )
            texts.append(part["text"])
        return "".join(texts)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    @model_validator(mode="after")
    def _check(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        for i, m in enumerate(self.messages):
            try:
                m.text()
            except ValueError as exc:
                raise ValueError(f"messages[{i}]: {exc}") from None
        return self

    def completion_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, v):
        if isinstance(v, list):
            if not v:
                raise ValueError("prompt must not be empty")
            if isinstance(v[0], list) and any(len(p) == 0 for p in v):
                raise ValueError("token prompts must not be empty")
        return v

    def prompts(self) -> list[str | list[int]]:
        """The batch of prompts: one string, a list of strings, or token id lists."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)

    def completion_limit(self) -> int | None:
        return self.max_tokens


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
