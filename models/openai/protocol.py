"""OpenAI request and response types: the one place the API's shapes are written down.

Requests are pydantic models that accept unknown fields (the official SDK sends fields we don't
use), but keep them in `model_extra` so the serving layer can name them in a warning instead of
dropping them silently. Tandem's extensions travel in the body (`extra_body` in the SDK): `rag`,
`steering`, `adapter`. `parse_request` turns a JSON body into one of them, or into a 400 naming
the field. Responses are models too, dumped to dicts once by the serving layer's entry points;
the streamed chunks stay dicts (a chunk is written per token, and a model per chunk is slower).
"""

from __future__ import annotations

import base64
import struct
import time
import uuid
from typing import Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    computed_field,
    field_validator,
    model_serializer,
    model_validator,
)

from models.engine.config import MAX_SPECULATIVE_K
from models.openai.errors import OpenAIError
from models.openai.tools import ChatTools, ResponseFormat, ToolCall
from models.protocol.requests import SteerVectorSpec
from models.protocol.steering import MAX_STEER_COEFF, SteeringMode, SteeringRequest

MAX_STOP_SEQUENCES = 4
MAX_TOP_LOGPROBS = 20
MAX_EMBEDDING_INPUTS = 2048

M = TypeVar("M", bound=BaseModel)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False


class RagOptions(BaseModel):
    """`rag` in a request: search these vector stores and put the top chunks into the prompt."""

    model_config = ConfigDict(extra="forbid")

    vector_store_ids: list[str] = Field(default_factory=list)
    top_k: int | None = Field(None, ge=1, le=50)
    score_threshold: float | None = Field(None, ge=-1, le=1)
    filters: dict[str, Any] | None = None  # on file attributes, as vector_stores.search takes


class SteeringVectorRef(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    coeff: float = Field(1.0, ge=-MAX_STEER_COEFF, le=MAX_STEER_COEFF)
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
            if self.params:
                raise OpenAIError("steering.params needs a steering.policy to apply to",
                                  400, param="steering.params", code="invalid_value")  # fmt: skip
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


class ActivationOptions(BaseModel):
    """`tandem.activations`, per generated token: the big model's residual stream after these
    blocks (`layers`), the scores of named probes (`probes`), its top `features` SAE features;
    `store: true` also writes them to the activation store (when the server has one)."""

    model_config = ConfigDict(extra="forbid")

    layers: list[int] = Field(default_factory=list, max_length=8)
    probes: list[str] = Field(default_factory=list, max_length=8)
    features: int = Field(0, ge=0, le=32)
    store: bool = False

    @model_validator(mode="after")
    def _asks_something(self) -> ActivationOptions:
        if not (self.layers or self.probes or self.features):
            raise ValueError("tandem.activations asks for nothing: give layers, probes or "
                             "features")  # fmt: skip
        return self


class SpeculativeOptions(BaseModel):
    """`tandem.speculative`: the small model drafts k tokens per step, the big model verifies
    them (exact: the same output as without). `false` is k = 0: this request not speculated."""

    model_config = ConfigDict(extra="forbid")

    k: int = Field(ge=0, le=MAX_SPECULATIVE_K)


class TandemOptions(BaseModel):
    """`tandem` in a request: Tandem's per-request extras that are not steering or RAG:
    `trace: true` keeps a per-token trace (GET /v1/traces/{id}); `activations` returns the
    big model's residual stream per token; `speculative` sets speculative decoding's k."""

    model_config = ConfigDict(extra="forbid")

    trace: bool = False
    activations: ActivationOptions | None = None
    speculative: SpeculativeOptions | None = None

    @field_validator("speculative", mode="before")
    @classmethod
    def _speculative_false_is_k0(cls, v):
        if v is False:
            return {"k": 0}
        if v is True:
            raise ValueError("give {\"k\": N} to speculate, or false for no speculation")
        return v

    def speculative_k(self) -> int | None:
        """The request's k (None: the server's default)."""
        return None if self.speculative is None else self.speculative.k


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
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    logit_bias: dict[str, float] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    repetition_penalty: float = Field(1.0, gt=0, le=10)
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    rag: RagOptions | None = None
    steering: SteeringOptions | None = None
    adapter: str | None = None
    tandem: TandemOptions | None = None

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


NULL_MESSAGE_FIELDS = ("refusal", "annotations", "audio", "function_call", "reasoning_content")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    @model_validator(mode="after")
    def _check(self):
        # an SDK message sent back as history carries these empty; anything else is not served
        extra = [k for k, v in (self.model_extra or {}).items()
                 if k not in NULL_MESSAGE_FIELDS or v not in (None, [], "")]  # fmt: skip
        if extra:
            raise ValueError(f"message field {extra[0]!r} is not supported")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs tool_call_id")
        return self

    def as_dict(self) -> dict:
        """{role, content} plus tool_calls / tool_call_id where set (developer is system)."""
        out: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role,
                               "content": self.text()}  # fmt: skip
        if self.tool_calls:
            out["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        if self.tool_call_id:
            out["tool_call_id"] = self.tool_call_id
        return out

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


class ChatCompletionRequest(SamplingFields, ChatTools):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: ResponseFormat | None = None

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


def _unit(vector: list[float]) -> list[float]:
    norm = sum(x * x for x in vector) ** 0.5
    return [x / norm for x in vector] if norm > 0 else vector


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def parse_request(model: type[M], body: Any) -> M:
    """`body` (parsed JSON) as a `model`; any problem is a 400 whose `param` names the field."""
    if not isinstance(body, dict):
        raise OpenAIError("the request body must be a JSON object", 400)
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        more = f" (and {len(exc.errors()) - 1} more problems)" if len(exc.errors()) > 1 else ""
        if err["type"] == "missing":
            text = f"missing required field '{where}'"
        else:
            text = f"invalid value for '{where}': {msg}" if where else msg
        raise OpenAIError(text + more, 400, param=where or None, code="invalid_value") from None


class EmbeddingRequest(BaseModel):
    """Body of POST /v1/embeddings; `input` is a string or strings (token ids are refused)."""

    model_config = ConfigDict(extra="forbid")  # any other field: a 400 naming it

    model: str | None = None
    input: list[str]
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None

    def respond(self, vectors: list[list[float]], tokens: int = 0) -> EmbeddingResponse:
        """The response, each vector as floats or as base64 of little-endian float32; with
        `dimensions`, its first that many floats, normalised again (OpenAI's shortening)."""
        if self.dimensions is not None and vectors and self.dimensions > len(vectors[0]):
            raise OpenAIError(f"dimensions must be at most {len(vectors[0])} for this model, "
                              f"got {self.dimensions}", param="dimensions")  # fmt: skip
        if self.dimensions is not None:
            vectors = [_unit(v[: self.dimensions]) for v in vectors]
        response = EmbeddingResponse.of(self.model or "all-MiniLM-L6-v2", vectors)
        response.usage = EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens)
        if self.encoding_format == "base64":
            for item in response.data:
                raw = struct.pack(f"<{len(item.embedding)}f", *item.embedding)
                item.embedding = base64.b64encode(raw).decode()
        return response

    @field_validator("input", mode="before")
    @classmethod
    def _check_input(cls, v):
        texts = [v] if isinstance(v, str) else v
        if not (isinstance(texts, list) and texts and all(isinstance(t, str) and t for t in texts)):
            raise ValueError("must be a non-empty string or list of non-empty strings")
        if len(texts) > MAX_EMBEDDING_INPUTS:
            raise ValueError(f"at most {MAX_EMBEDDING_INPUTS} inputs per request")
        return texts


class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int

    @computed_field
    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatLogprobToken(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatLogprobToken]


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class ChoiceError(BaseModel):
    """A choice that ended with finish_reason "error", and why."""

    index: int
    message: str


class TandemInfo(BaseModel):
    """A response's `tandem` object: chosen adapter, router decision, sources, interventions."""

    request_id: str | None = None  # x-request-id: also in the response header, logs, traces
    adapter: str | None = None
    router: dict[str, Any] | None = None  # the Router's decision when the model was `<base>:auto`
    sources: list[dict[str, Any]] = Field(default_factory=list)
    interventions: list[dict[str, Any]] = Field(default_factory=list)
    errors: list[ChoiceError] | None = None
    # steered choices that went on unsteered: {"index", "reason", "message"}
    unsteered_because: list[dict[str, Any]] | None = None
    activations: list[dict[str, Any]] | None = None  # per choice, when the request asked
    # speculated choices: {"k", "proposed", "accepted"} summed; choices that could not be:
    # {"index", "reason"}
    speculative: dict[str, int] | None = None
    unspeculated_because: list[dict[str, Any]] | None = None

    @model_serializer(mode="wrap")
    def _errors_only_when_any(self, handler):
        data = handler(self)
        for key in ("errors", "unsteered_because", "activations", "speculative",
                    "unspeculated_because"):  # fmt: skip
            if getattr(self, key) is None:
                del data[key]
        return data


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None

    @model_serializer(mode="wrap")
    def _optional_fields_only_when_set(self, handler):
        data = handler(self)
        for name in ("tool_calls", "reasoning_content"):
            if not data[name]:
                del data[name]
        return data


class ChatCompletionChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None


class _Completion(BaseModel):
    """What chat and text completions share; the subclasses fix `object` and the choice type."""

    id: str
    object: str
    created: int = Field(default_factory=now)
    model: str
    choices: list[Any]
    usage: UsageInfo
    tandem: TandemInfo


class ChatCompletionResponse(_Completion):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatCompletionChoice]


class CompletionResponse(_Completion):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "tandem"
    root: str
    parent: str | None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str  # str: base64 (encoding_format "base64")


class EmbeddingUsage(BaseModel):
    prompt_tokens: int = 0
    total_tokens: int = 0


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    model: str
    data: list[EmbeddingData]
    usage: EmbeddingUsage = Field(default_factory=EmbeddingUsage)

    @classmethod
    def of(cls, model: str, vectors: list[list[float]]) -> EmbeddingResponse:
        data = [EmbeddingData(index=i, embedding=v) for i, v in enumerate(vectors)]
        return cls(model=model, data=data)
