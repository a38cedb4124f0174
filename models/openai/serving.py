"""The serving logic behind the OpenAI routes, free of Ray and HTTP so it runs in-process.

`OpenAIServing` validates a request, asks the router and the retriever concurrently, builds the
prompt (retrieved sources numbered [1], [2], ...), fans `n` out into engine requests and turns
the engine's outputs into OpenAI responses or server-sent-event chunks. What it calls lives
behind `Backends`: the Ingress deployment fills it with Ray Serve handles, tests with local
objects.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from models.activations.reader import ActivationReader
from models.activations.store import ActivationStore
from models.openai.activations import ActivationPlan, StoreRecorder, activation_plan
from models.openai.chat_output import ChoiceStream as ChatParser
from models.openai.chat_output import message_fields, reasons
from models.openai.chat_template import chat_prompt_ids
from models.openai.errors import OpenAIError, to_openai_error
from models.openai.logprobs import chat_logprobs, text_logprobs
from models.openai.protocol import (
    AssistantMessage,
    ChatCompletionChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    SamplingFields,
    TandemInfo,
    UsageInfo,
    new_id,
    now,
    parse_request,
)
from models.openai.streaming import ChoiceStream, StreamedResponse, final_tandem, sse_events
from models.openai.streaming import finish_reason as _finish
from models.openai.tokenize import detokenize, tokenize
from models.protocol.constraints import OutputConstraint
from models.protocol.errors import AdapterNotFoundError, VectorNotFoundError
from models.protocol.outputs import RequestOutput
from models.protocol.requests import GenerationRequest, SamplingParams, SteerVectorSpec
from models.protocol.steering import SteeringMode, SteeringRequest
from models.steering.policies.admission import PolicyAdmission
from models.steering.policies.base import PolicyParamsError
from models.tracing import current_request_id

if TYPE_CHECKING:
    from models.config import TandemConfig

logger = logging.getLogger("tandem.serving")


@dataclass
class Backends:
    """What the serving layer calls. Each is an async callable; see OpenAIServing for use.

    route(prompt) -> {"adapter": str|None, "confidence": float, "candidates": [[name, p]],
                      "weights": {name: w} | None}
    search(query, vector_store_ids, top_k, score_threshold[, filters]) -> [hit dicts]
    generate(GenerationRequest) -> async iterator of RequestOutput
    adapters() -> [names the Generator can serve];  vectors() -> [steering vector names]
    """

    generate: Callable[[GenerationRequest], AsyncIterator[RequestOutput]]
    route: Callable[[str], Awaitable[dict]] | None = None
    search: Callable[..., Awaitable[list[dict]]] | None = None
    adapters: Callable[[], Awaitable[list[str]]] | None = None
    vectors: Callable[[], Awaitable[list[str]]] | None = None


@dataclass
class ServingLimits:
    """Request limits and defaults the serving layer enforces."""

    max_model_len: int
    vocab_size: int
    max_n: int = 8
    default_max_tokens: int = 64
    default_vector_store_ids: list[str] = field(default_factory=list)
    default_top_k: int = 4
    policies: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> default params
    default_steering_mode: SteeringMode = "async"
    steering_timeout_s: float = 2.0
    policy_admission: PolicyAdmission | None = None  # types each request's steering.params
    trace_all: bool = False  # every request keeps a per-token trace


@dataclass
class PreparedRequest:
    """A validated request, resolved against router and retriever, ready for the engine."""

    request_id: str
    model: str
    prompt_ids: list[list[int]]  # one per prompt (completions may batch prompts)
    prompt_texts: list[str]
    params: list[SamplingParams]  # one per choice within a prompt
    adapter: str | None
    adapter_weights: dict[str, float] | None
    steer_vectors: list[SteerVectorSpec]
    steering: SteeringRequest | None
    tandem: TandemInfo
    stream: bool
    include_usage: bool
    n: int
    echo: bool = False  # completions: the prompt text leads each choice's text
    trace: bool = False  # keep a per-token trace under tandem.request_id
    constraint: OutputConstraint | None = None  # response_format or a forced tool call
    tools: bool = False  # chat with tools offered: `<tool_call>` output becomes tool_calls
    hidden_layers: ActivationPlan = field(default_factory=lambda: ActivationPlan([], []))
    speculative_k: int | None = None  # tandem.speculative.k (None: the server's default)


class OpenAIServing:
    """Chat and text completions over an engine, with routing and retrieval."""

    def __init__(self, *, model_name: str, tokenizer: Any, backends: Backends, limits: ServingLimits,
                 activations: ActivationReader | None = None,
                 store: ActivationStore | None = None):  # fmt: skip
        self.model_name = model_name
        self.tokenizer = tokenizer
        self.backends = backends
        self.limits = limits
        self.activations = activations  # probes and SAE features for tandem.activations
        self.store = store  # where tandem.activations.store rows go
        self.reasoning = reasons(tokenizer)  # parse `<think>` into reasoning_content

    @classmethod
    def from_config(cls, config: TandemConfig, backends: Backends) -> OpenAIServing:
        """The serving layer for a Tandem config, with the big model's tokenizer and window."""
        from transformers import AutoConfig, AutoTokenizer

        from models.builtin import resolve_source

        big = resolve_source(config.model.source).big
        model_cfg = AutoConfig.from_pretrained(big)
        limits = ServingLimits(
            max_model_len=config.engine.max_model_len or model_cfg.max_position_embeddings,
            vocab_size=model_cfg.vocab_size,
            max_n=config.server.max_n,
            default_max_tokens=config.server.default_max_tokens,
            default_vector_store_ids=config.retrieval.default_vector_store_ids,
            default_top_k=config.retrieval.default_top_k,
            policies={p.name: dict(p.params) for p in config.steering.policies},
            default_steering_mode=config.steering.default_mode,
            steering_timeout_s=config.steering.timeout_s,
            policy_admission=PolicyAdmission.from_config(
                config.steering, getattr(model_cfg, "num_hidden_layers", None)),
            trace_all=config.telemetry.trace_all,
        )
        reader = ActivationReader.from_steering(config.steering, big, model_cfg.hidden_size,
                                                model_cfg.num_hidden_layers)  # fmt: skip
        store = ActivationStore(config.activation_store) if config.activation_store.dir else None
        return cls(model_name=config.model.name, tokenizer=AutoTokenizer.from_pretrained(big),
                   backends=backends, limits=limits, activations=reader, store=store)

    # ---- public entry points ------------------------------------------------------------

    async def chat(self, body: Any) -> dict | AsyncIterator[str]:
        """A chat completion: a response dict, or an async iterator of SSE lines when streamed."""
        req = parse_request(ChatCompletionRequest, body)
        req.check()
        messages = [m.as_dict() for m in req.messages]
        tools = [t.model_dump(exclude_none=True) for t in req.tools or []] if req.active else None
        query = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
        prep = await self._prepare(
            req, query, lambda ctx: [chat_prompt_ids(self.tokenizer, messages, tools, ctx)])
        formatted = req.response_format.constraint() if req.response_format else None
        calls = req.constraint()  # tool_choice auto: optional (response_format goes first)
        if formatted and calls and not calls.optional:
            raise OpenAIError("response_format cannot be combined with a required or named "
                              "tool_choice", param="response_format")  # fmt: skip
        prep.constraint, prep.tools = formatted or calls, req.active
        if req.logprobs:
            for p in prep.params:
                p.logprobs = req.top_logprobs or 0
        return await self._respond(prep, chat=True)

    async def completions(self, body: Any) -> dict | AsyncIterator[str]:
        """A text completion; `prompt` may be a string, strings, or token ids."""
        req = parse_request(CompletionRequest, body)
        if req.suffix:
            raise OpenAIError("suffix is not supported by this model", param="suffix")
        prompts = req.prompts()
        vocab = self.limits.vocab_size
        if any(not 0 <= t < vocab for p in prompts if isinstance(p, list) for t in p):
            raise OpenAIError(f"prompt token ids must lie in [0, {vocab})", param="prompt")
        query = prompts[0] if isinstance(prompts[0], str) else self.tokenizer.decode(prompts[0])

        def build(ctx: str) -> list[list[int]]:
            return [self._text_prompt(p, ctx) for p in prompts]

        prep = await self._prepare(req, query, build)
        if req.logprobs is not None:
            for p in prep.params:
                p.logprobs = req.logprobs
        prep.echo = req.echo
        return await self._respond(prep, chat=False)

    async def list_models(self) -> dict:
        """GET /v1/models: the base, every `<base>:<adapter>`, and `<base>:auto`."""
        names = await self._adapter_names()
        created, base = now(), self.model_name
        ids = [base, f"{base}:auto"] + [f"{base}:{a}" for a in names]
        cards = [ModelCard(id=i, created=created, root=base, parent=None if i == base else base)
                 for i in ids]
        return ModelList(data=cards).model_dump()

    async def tokenize(self, body: Any) -> dict:
        return tokenize(self.tokenizer, self.model_name, self.limits.max_model_len, body)

    async def detokenize(self, body: Any) -> dict:
        return detokenize(self.tokenizer, self.model_name, self.limits.vocab_size, body)

    async def retrieve_model(self, model_id: str) -> dict:
        """GET /v1/models/{id}: one card of list_models, or a 404."""
        card = next((c for c in (await self.list_models())["data"] if c["id"] == model_id), None)
        if card is None:
            raise OpenAIError(f"model '{model_id}' does not exist", 404, param="model",
                              code="model_not_found")  # fmt: skip
        return card

    # ---- preparation --------------------------------------------------------------------

    async def _prepare(
        self, req: SamplingFields, query: str, build: Callable[[str], list[list[int]]]
    ) -> PreparedRequest:
        if unknown := req.unknown_fields():
            raise OpenAIError(f"unsupported parameter(s): {', '.join(unknown)}; this server "
                              "cannot honour them", param=unknown[0],
                              code="unsupported_parameter")  # fmt: skip
        if req.n > self.limits.max_n:
            raise OpenAIError(f"n must be at most {self.limits.max_n}, got {req.n}", param="n")
        adapter_field = await self._adapter_request(req)
        steer_vectors, steering = await self._steering(req)
        route_task = self._route(adapter_field, query)
        search_task = self._search(req, query)
        decision, hits = await asyncio.gather(route_task, search_task)
        context = self._format_sources(hits) if hits else ""
        prompt_ids = build(context)
        request_id = new_id("chatcmpl" if isinstance(req, ChatCompletionRequest) else "cmpl")
        tandem = TandemInfo(
            request_id=current_request_id() or request_id,
            adapter=decision.get("adapter"),
            router=decision if adapter_field == "auto" else None,
            sources=self._sources_for_response(hits) if hits else [],
        )
        limit = req.completion_limit()
        params = []
        for i in range(req.n):
            params.append(self._sampling(req, i, limit, max(len(p) for p in prompt_ids)))
        return PreparedRequest(
            request_id=request_id,
            model=req.model,
            prompt_ids=prompt_ids,
            prompt_texts=[],
            params=params,
            adapter=decision.get("adapter") if not decision.get("weights") else None,
            adapter_weights=decision.get("weights"),
            steer_vectors=steer_vectors,
            steering=steering,
            tandem=tandem,
            stream=req.stream,
            include_usage=bool(req.stream_options and req.stream_options.include_usage),
            n=req.n,
            trace=self.limits.trace_all or bool(req.tandem and req.tandem.trace),
            hidden_layers=await activation_plan(req, params[0].max_tokens, self.activations,
                                                self.store),
            speculative_k=req.tandem.speculative_k() if req.tandem else None,
        )

    async def _adapter_request(self, req: SamplingFields) -> str | None:
        """The adapter the request asks for: None (base), 'auto', or a name; 404 if unknown."""
        base, _, suffix = req.model.partition(":")
        if base != self.model_name:
            raise OpenAIError(
                f"model '{req.model}' does not exist; available: {self.model_name}, "
                f"{self.model_name}:auto, {self.model_name}:<adapter>",
                404, param="model", code="model_not_found",
            )
        wanted = req.adapter or suffix or None
        if wanted in (None, "base"):
            return None
        if wanted == "auto":
            return "auto"
        names = await self._adapter_names()
        if wanted not in names:
            raise to_openai_error(AdapterNotFoundError.naming(wanted, names, param="model"))
        return wanted

    async def _route(self, adapter_field: str | None, query: str) -> dict:
        if adapter_field != "auto":
            return {"adapter": adapter_field, "confidence": 1.0, "candidates": [], "weights": None}
        if self.backends.route is None:
            return {"adapter": None, "confidence": 0.0, "candidates": [], "weights": None}
        return await self.backends.route(query)

    async def _search(self, req: SamplingFields, query: str) -> list[dict]:
        rag = req.rag
        store_ids = (rag.vector_store_ids if rag else []) or self.limits.default_vector_store_ids
        if not store_ids or self.backends.search is None or not query.strip():
            return []
        top_k = (rag.top_k if rag and rag.top_k else None) or self.limits.default_top_k
        threshold = rag.score_threshold if rag else None
        if rag and rag.filters:
            return await self.backends.search(query, store_ids, top_k, threshold, rag.filters)
        return await self.backends.search(query, store_ids, top_k, threshold)

    async def _steering(
        self, req: SamplingFields
    ) -> tuple[list[SteerVectorSpec], SteeringRequest | None]:
        s = req.steering
        if s is None:
            return [], None
        limits = self.limits
        policy = s.to_request(limits.policies, limits.default_steering_mode,
                              limits.steering_timeout_s)  # fmt: skip
        named = [(v.name, "steering.vectors") for v in s.vectors]
        if policy is not None and limits.policy_admission is not None:
            try:
                vectors = limits.policy_admission.check(policy.policy, s.params)
            except PolicyParamsError as exc:
                raise OpenAIError(str(exc), 400, param=exc.param, code="invalid_value") from None
            named += [(name, "steering.params.vector") for name in vectors]
        if named:
            known = await self._vector_names()
            for name, param in named:
                sae_index = param == "steering.vectors" and self._sae_vector(name)
                if name not in known and not sae_index:
                    raise to_openai_error(VectorNotFoundError.naming(name, known, param=param))
        return s.vector_specs(), policy

    def _sampling(self, req: SamplingFields, i: int, limit: int | None, prompt_len: int) -> SamplingParams:
        room = self.limits.max_model_len - prompt_len
        if room < 1:
            raise OpenAIError(
                f"the prompt has {prompt_len} tokens but the model's context window is "
                f"{self.limits.max_model_len}; shorten the prompt",
                param="messages", code="context_length_exceeded",
            )
        if limit is None:
            max_tokens = min(self.limits.default_max_tokens, room)
        elif limit > room:
            raise OpenAIError(
                f"max_tokens is {limit} but only {room} tokens fit after the {prompt_len}-token "
                f"prompt (context window {self.limits.max_model_len}); lower max_tokens",
                param="max_tokens", code="context_length_exceeded",
            )
        else:
            max_tokens = limit
        if req.top_k > self.limits.vocab_size:
            raise OpenAIError(
                f"top_k is {req.top_k}; it must be at most the vocabulary size "
                f"({self.limits.vocab_size}), or 0 for off", param="top_k",
            )  # fmt: skip
        bias = {}
        for key, value in (req.logit_bias or {}).items():
            tid = int(key)
            if not 0 <= tid < self.limits.vocab_size:
                raise OpenAIError(
                    f"logit_bias token id {tid} is outside the vocabulary (0..{self.limits.vocab_size - 1})",
                    param="logit_bias",
                )
            bias[tid] = value
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=req.temperature,
            top_p=req.top_p,
            top_k=req.top_k,
            seed=None if req.seed is None else req.seed + i,
            stop=req.stop_list(),
            ignore_eos=req.ignore_eos,
            logit_bias=bias,
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            repetition_penalty=req.repetition_penalty,
            min_tokens=min(req.min_tokens, max_tokens),
        )

    # ---- prompts --------------------------------------------------------------------------

    def _text_prompt(self, prompt: str | list[int], context: str) -> list[int]:
        if isinstance(prompt, list):  # ids checked by `completions`
            ctx = self.tokenizer.encode(context + "\n\n", add_special_tokens=False) if context else []
            return ctx + prompt
        if not prompt:
            raise OpenAIError("prompt must not be empty", param="prompt")
        text = f"{context}\n\n{prompt}" if context else prompt
        return self.tokenizer.encode(text, add_special_tokens=False)

    @staticmethod
    def _format_sources(hits: list[dict]) -> str:
        from models.retrieval.prompt import format_sources

        return format_sources(hits)

    @staticmethod
    def _sources_for_response(hits: list[dict]) -> list[dict]:
        from models.retrieval.prompt import sources_for_response

        return sources_for_response(hits)

    # ---- generation -----------------------------------------------------------------------

    def _engine_requests(self, prep: PreparedRequest) -> list[GenerationRequest]:
        reqs = []
        for p_idx, ids in enumerate(prep.prompt_ids):
            for c_idx, params in enumerate(prep.params):
                index = p_idx * prep.n + c_idx
                reqs.append(
                    GenerationRequest(
                        request_id=f"{prep.request_id}-{index}",
                        prompt_token_ids=ids,
                        params=replace(params),
                        adapter=prep.adapter,
                        adapter_weights=prep.adapter_weights,
                        steer_vectors=list(prep.steer_vectors),
                        steering=prep.steering,
                        trace_id=prep.tandem.request_id if prep.trace else None,
                        constraint=prep.constraint,
                        hidden_layers=list(prep.hidden_layers),
                        speculative_k=prep.speculative_k,
                    )
                )
        return reqs

    async def _respond(self, prep: PreparedRequest, chat: bool) -> dict | AsyncIterator[str]:
        reqs = self._engine_requests(prep)
        outputs = [self.backends.generate(r) for r in reqs]
        if prep.hidden_layers.store and self.store is not None:
            recorder = StoreRecorder(self.store, prep.tandem.request_id, prep.hidden_layers,
                                     self.tokenizer, len(reqs))  # fmt: skip
            outputs = [recorder.wrap(i, it) for i, it in enumerate(outputs)]
        streams = [ChoiceStream(it) for it in outputs]
        # The first output of every choice arrives before we answer, so errors found at admission
        # (adapter unknown, prompt too long, queue full) become proper HTTP errors, not broken SSE.
        try:
            await asyncio.gather(*(s.prime() for s in streams))
        except BaseException as exc:
            await asyncio.gather(*(s.close() for s in streams), return_exceptions=True)
            if isinstance(exc, Exception):
                raise to_openai_error(exc) from exc
            raise
        if prep.stream:
            return self._sse(prep, streams, chat)
        return await self._collect(prep, streams, chat)

    async def _collect(self, prep: PreparedRequest, streams: list[ChoiceStream], chat: bool) -> dict:
        try:
            choices = await asyncio.gather(*(s.drain() for s in streams))
        finally:  # on cancellation (client gone) too: the engine stops work on every choice
            await asyncio.gather(*(s.close() for s in streams), return_exceptions=True)
        usage = UsageInfo(prompt_tokens=sum(len(ids) for ids in prep.prompt_ids),
                          completion_tokens=sum(c.num_generated for c in choices))
        tandem = final_tandem(prep.tandem, choices, prep.hidden_layers)
        if chat:
            return ChatCompletionResponse(
                id=prep.request_id, model=prep.model, usage=usage, tandem=tandem,
                choices=[ChatCompletionChoice(
                    index=i, message=(m := AssistantMessage(
                        **message_fields(c.text, self.reasoning, prep.tools))),
                    finish_reason=_finish(c.finish_reason, bool(m.tool_calls)),
                    logprobs=None if c.logprobs is None else chat_logprobs(self.tokenizer, c.logprobs),
                ) for i, c in enumerate(choices)],
            ).model_dump()
        return CompletionResponse(
            id=prep.request_id, model=prep.model, usage=usage, tandem=tandem,
            choices=[CompletionChoice(
                index=i, text=self._echo(prep, i) + c.text, finish_reason=c.finish_reason,
                logprobs=None if c.logprobs is None else text_logprobs(self.tokenizer, c.logprobs),
            ) for i, c in enumerate(choices)],
        ).model_dump()

    def _echo(self, prep: PreparedRequest, choice: int) -> str:
        """The prompt text that leads a completion choice when `echo` is set, else ""."""
        return self.tokenizer.decode(prep.prompt_ids[choice // prep.n]) if prep.echo else ""

    def _sse(self, prep: PreparedRequest, streams: list[ChoiceStream], chat: bool) -> AsyncIterator[str]:
        parsed = chat and (prep.tools or self.reasoning)
        resp = StreamedResponse(
            prep.request_id, prep.model, prep.tandem, sum(len(ids) for ids in prep.prompt_ids),
            prep.include_usage, (lambda i: self._echo(prep, i)) if prep.echo else None,
            [ChatParser(self.reasoning, prep.tools) for _ in streams] if parsed else None,
            prep.hidden_layers)
        lps = chat_logprobs if chat else text_logprobs
        return sse_events(resp, streams, chat, lambda lp: lps(self.tokenizer, lp))

    async def _adapter_names(self) -> list[str]:
        return list(await self.backends.adapters()) if self.backends.adapters else []

    def _sae_vector(self, name: str) -> bool:
        """Whether `name` is `sae:<index>` (or a named feature) of the configured SAE: the
        Generator registers such a vector when `steering.vectors` first names it (a policy's
        `vector` takes the named features, which every replica registers at start)."""
        return self.activations is not None and self.activations.vector_feature(name) is not None

    async def _vector_names(self) -> list[str]:
        return list(await self.backends.vectors()) if self.backends.vectors else []


