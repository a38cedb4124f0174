"""VllmEngine: the Engine contract over vLLM's async engine (AsyncLLM), in the Generator replica.

What maps onto vLLM: every sampling field of a GenerationRequest (temperature, top_p, top_k,
seed, logit_bias, presence / frequency / repetition penalties, min_tokens), stop strings and
stop token ids, ignore_eos, logprobs (the sampled token's and the top alternatives, after logit
bias, penalties, steering and grammar, as the torch engine's: vLLM's `processed_logprobs`),
abort, usage counts, and LoRA adapters as `LoRARequest`s loaded and unloaded at runtime (one
batch mixes them, as vLLM's multi-LoRA does). n > 1 arrives as n requests (the API layer splits
it). Structured output (response_format, `required` / named tool_choice) runs through vLLM's own
guided decoding with the guidance backend (llguidance, the torch engine's compiler too); the
grammar is checked before admission (a 400), and constrained rows close their output near
max_tokens as in the torch engine (logits.py). Logit policies (proxy_tuning, contrastive) run
through vLLM's logits-processor interface (models.engines.vllm.logits) inside vLLM's engine
process, with the request's policy and parameters as per-request arguments. Steering vectors
(steer_vectors: h_l += c * v_l after layer l) run as forward hooks in vLLM's workers, in eager
mode only (models.engines.vllm.hooks; engine.cuda_graphs: false on a GPU), with the steered
prompt's KV blocks kept apart from the plain prompt's (cache_salt). What vLLM cannot do here is
refused by `capabilities` (a 400 naming the engine and the capability): steering vectors
without eager mode, returning hidden states (tandem.activations), token-event policies
(ForceTokens, SteerVector, Backtrack...), weighted adapter mixes. A request's speculative_k is ignored:
vLLM's speculative decoding is engine-wide (engine.vllm.speculative_config), and output-neutral.

Known differences from the torch engine, bounded: a seeded sampled row is reproducible but
draws other tokens (vLLM's own random streams); with presence/frequency AND repetition
penalties on one request, vLLM applies repetition first (the torch engine last), so only that
combination can pick other tokens; vLLM adds logit_bias before the steering processor (the
torch engine after), which only matters to contrastive's plausibility head; sampled rows'
logprobs are after temperature and top-k/top-p in vLLM (equal for greedy rows and temperature
1 without truncation).

The `engine:` settings map to vLLM's engine arguments (`engine_args`); `engine.vllm:` is passed
through verbatim last, so any AsyncEngineArgs field (tensor_parallel_size with
distributed_executor_backend "ray", gpu_memory_utilization, ...) can be set.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import torch
import vllm
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.lora.request import LoRARequest
from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams
from vllm.v1.engine.async_llm import AsyncLLM

from models.engine.admission import check_generation
from models.engine.config import EngineConfig
from models.engine.constraints import RowConstraints
from models.engine.llm_engine import eos_token_ids, load_tokenizer
from models.engines.vectors import check_vectors, vector_deltas
from models.engines.vllm.hooks import EXTENSION, VECTORS_KEY
from models.engines.vllm.logits import PROCESSOR, SETUP_KEY, steering_args
from models.protocol.constraints import OutputConstraint
from models.protocol.engine import Engine, EngineCapabilities, check_capabilities
from models.protocol.errors import (
    AdapterNotFoundError,
    EngineError,
    EngineFailedError,
    EngineOverloadedError,
)
from models.protocol.outputs import EngineStats, RequestOutput, TokenLogprob
from models.protocol.requests import GenerationRequest
from models.protocol.steering import StepObserver
from models.steering.config import SteeringSetup
from models.steering.policies import policy_needs

log = logging.getLogger(__name__)
MAX_LOGPROBS = 20  # the OpenAI API's cap; engine.vllm.max_logprobs raises it


def engine_args(config: EngineConfig, model_path: str, steering: SteeringSetup | None) -> dict:
    """vLLM engine arguments from the `engine:` block; `engine.vllm` overrides any of them."""
    on_cpu = config.device == "cpu" or (config.device == "auto" and not torch.cuda.is_available())
    dtype = {"auto": "float32" if on_cpu else "bfloat16"}.get(config.dtype, config.dtype)
    args: dict[str, Any] = dict(
        model=model_path, dtype=dtype, seed=config.seed, max_num_seqs=config.max_num_seqs,
        max_num_batched_tokens=config.max_num_batched_tokens, max_model_len=config.max_model_len,
        enable_lora=config.max_adapters_per_replica > 0, max_lora_rank=config.max_lora_rank,
        max_loras=max(1, config.max_adapters_per_replica), max_logprobs=MAX_LOGPROBS,
        enforce_eager=on_cpu or not config.cuda_graphs, enable_prefix_caching=config.prefix_caching,
        logprobs_mode="processed_logprobs",  # after bias, penalties, steering and grammar
    )  # fmt: skip
    if on_cpu:  # one process less (no worker process), and a KV cache of the configured size
        args.update(distributed_executor_backend="uni",
                    kv_cache_memory_bytes=int(config.kv_cache_cpu_gib * 2**30))  # fmt: skip
    else:
        args["gpu_memory_utilization"] = config.kv_cache_memory_fraction
    if config.structured_output:  # llguidance, as the torch engine's compiler; compact JSON
        args["structured_outputs_config"] = {"backend": "guidance", "disable_any_whitespace": True}
    steered = steering is not None and bool(steering.steering.policies)
    if steered or config.structured_output:  # steering, and closing constrained output in time
        args["logits_processors"] = [PROCESSOR]
    if steered:
        args["additional_config"] = {SETUP_KEY: steering.model_dump(mode="json")}
    if args["enforce_eager"]:  # steering vectors by forward hooks (hooks.py): eager mode only
        args["worker_extension_cls"] = EXTENSION
    args.update(config.vllm)
    return args


class VllmEngine(Engine):
    """vLLM's AsyncLLM behind the Engine contract (see the module docstring)."""

    name = "vllm"

    def __init__(self, config: EngineConfig, model_path: str | Path,
                 steering: SteeringSetup | None = None):  # fmt: skip
        self.config = config
        self.model_path = str(model_path)
        self.tokenizer = load_tokenizer(model_path)
        hf = json.loads((Path(model_path) / "config.json").read_text())
        self.vocab_size = hf["vocab_size"]
        self.max_model_len = config.max_model_len or hf.get("max_position_embeddings", 4096)
        self.args = engine_args(config, self.model_path, steering)
        self.policies = (
            {p.name for p in steering.steering.policies} if "additional_config" in self.args
            else set()
        )  # fmt: skip
        self.policy_needs = policy_needs(steering.steering.policies) if steering else {}
        self.capabilities = EngineCapabilities(
            logit_steering=bool(self.policies), per_row_lora=self.args["enable_lora"],
            structured_output="structured_outputs_config" in self.args,
            hidden_state_steering=bool(self.args.get("enforce_eager"))
            and self.args.get("worker_extension_cls") == EXTENSION,
        )
        self.num_layers = hf["num_hidden_layers"]
        self._hooked = False
        # the torch engine's compiler checks a request's grammar before admission (a 400);
        # vLLM's guidance backend then compiles the same grammar for its own bitmask
        self.constraints = RowConstraints(config.structured_output, self.tokenizer,
                                          self.vocab_size, eos_token_ids(model_path),
                                          torch.device("cpu"))  # fmt: skip
        self.llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**self.args))
        self.vectors: dict[str, torch.Tensor] = {}
        self._vector_versions: dict[str, int] = {}
        self._loras: dict[str, LoRARequest] = {}
        self._next_lora_id = 1
        self._live: set[str] = set()
        self._stats = EngineStats()

    async def start(self) -> None:
        """Hook the decoder layers in vLLM's workers (once) when steering vectors can run."""
        if self.capabilities.hidden_state_steering and not self._hooked:
            await self.llm.collective_rpc("tandem_install_hooks")
            self._hooked = True

    def shutdown(self) -> None:
        self.llm.shutdown()

    def check_request(self, request: GenerationRequest) -> None:
        steering = request.steering
        if steering is not None and steering.policy not in self.policies:
            raise EngineError(
                f"steering policy '{steering.policy}' is not configured for the vllm engine; "
                f"configured: {', '.join(sorted(self.policies)) or 'none'}", "steering.policy")
        check_capabilities(self, request, self.policy_needs)  # also when used without a Generator
        max_logprobs = self.args.get("max_logprobs", MAX_LOGPROBS)
        check_generation(request, self.vocab_size, self.max_model_len, max_logprobs)
        if guided(request) is not None:
            self.constraints.check(request)
        check_vectors(request, self.vectors, self.num_layers)
        if request.request_id in self._live:
            raise EngineError(f"request id '{request.request_id}' is already running")
        if len(self._live) >= self.config.max_num_seqs + self.config.max_queue_len:
            raise EngineOverloadedError(
                f"the engine queue is full ({self.config.max_queue_len} waiting); retry later"
            )
        name = self._adapter_of(request)
        if name is not None and name not in self._loras:
            raise AdapterNotFoundError.naming(name, self._loras, param="model")

    @staticmethod
    def _adapter_of(request: GenerationRequest) -> str | None:
        """The one adapter a request runs with (a router mix of one counts as that one)."""
        if request.adapter is None and request.adapter_weights and len(
            request.adapter_weights) == 1:  # fmt: skip
            return next(iter(request.adapter_weights))
        return request.adapter

    def sampling_params(self, request: GenerationRequest) -> vllm.SamplingParams:
        """The request's sampling as vLLM's SamplingParams (deltas: new tokens per output)."""
        p = request.params
        return vllm.SamplingParams(
            max_tokens=p.max_tokens, temperature=p.temperature, top_p=p.top_p, top_k=p.top_k,
            seed=p.seed, stop=list(p.stop) or None, stop_token_ids=list(p.stop_token_ids),
            ignore_eos=p.ignore_eos, logprobs=p.logprobs, logit_bias=dict(p.logit_bias) or None,
            presence_penalty=p.presence_penalty, frequency_penalty=p.frequency_penalty,
            repetition_penalty=p.repetition_penalty, min_tokens=p.min_tokens,
            structured_outputs=structured_outputs(guided(request)),
            output_kind=RequestOutputKind.DELTA, skip_special_tokens=True,
            extra_args={**(steering_args(request) or {}), **self.vector_args(request)} or None,
        )  # fmt: skip

    def vector_args(self, request: GenerationRequest) -> dict:
        """The request's steering vectors as the hooks' per-request argument: for each layer,
        the sum of c * v_l over its vectors (floats), or {} when it has none."""
        deltas = vector_deltas(request, self.vectors)
        if not deltas:
            return {}
        return {VECTORS_KEY: {str(k): v.tolist() for k, v in sorted(deltas.items())}}

    async def generate(self, request: GenerationRequest) -> AsyncIterator[RequestOutput]:
        """Stream RequestOutputs as vLLM produces them; the last has finished=True."""
        self.check_request(request)
        rid, prompt = request.request_id, list(request.prompt_token_ids)
        name = self._adapter_of(request)
        lora = self._loras[name] if name is not None else None
        params = self.sampling_params(request)
        inputs: dict[str, Any] = {"prompt_token_ids": prompt}
        if request.steer_vectors:  # steered KV blocks are not the plain prompt's: own cache
            inputs["cache_salt"] = repr([(s.name, self._vector_versions[s.name], s.coeff,
                                          s.layers) for s in request.steer_vectors])  # fmt: skip
        self._live.add(rid)
        self._stats.max_running_seen = max(self._stats.max_running_seen, len(self._live))
        generated = 0
        try:
            stream = self.llm.generate(inputs, params, rid, lora_request=lora)
            async for out in stream:
                done = out.outputs[0]
                generated += len(done.token_ids)
                self._stats.generated_tokens += len(done.token_ids)
                yield RequestOutput(
                    request_id=rid, token_ids=list(done.token_ids), text=done.text,
                    finished=out.finished,
                    finish_reason=_finish_reason(done.finish_reason) if out.finished else None,
                    logprobs=_logprobs(done.token_ids, done.logprobs, request.params.logprobs),
                    num_prompt_tokens=len(prompt), num_generated_tokens=generated,
                )  # fmt: skip
        except ValueError as exc:  # vLLM's validation of the request (VLLMValidationError)
            raise EngineError(f"vllm refused the request: {exc}") from exc
        except Exception as exc:
            if self.llm.errored:
                raise EngineFailedError(f"the vllm engine failed: {exc!r}") from exc
            raise
        finally:
            self._live.discard(rid)

    async def abort(self, request_id: str) -> None:
        await self.llm.abort(request_id)

    async def check_health(self) -> None:
        try:
            await self.llm.check_health()
        except Exception as exc:
            raise EngineFailedError(f"the vllm engine failed: {exc!r}") from exc

    async def load_adapter(self, name: str, path: str) -> None:
        """Load a PEFT adapter into vLLM's LoRA slots (a new id; replaces one of that name)."""
        if name in self._loras:
            await self.unload_adapter(name)
        lora = LoRARequest(name, self._next_lora_id, str(path))
        self._next_lora_id += 1
        try:
            await self.llm.add_lora(lora)
        except Exception as exc:
            raise EngineError(f"adapter '{name}' could not be loaded by vllm: {exc}") from exc
        self._loras[name] = lora

    async def unload_adapter(self, name: str) -> None:
        lora = self._loras.pop(name, None)
        if lora is None:
            raise AdapterNotFoundError.naming(name, self._loras)
        await self.llm.remove_lora(lora.lora_int_id)

    def adapters(self) -> list[str]:
        return sorted(self._loras)

    def register_vector(self, name: str, vector: torch.Tensor) -> None:
        """A steering vector [num_layers, hidden]; its rows ride with each request that names
        it (hooks.py). Without eager mode requests naming it are refused by capability."""
        self.vectors[name] = vector.detach().to("cpu", torch.float32)
        self._vector_versions[name] = self._vector_versions.get(name, 0) + 1

    def set_step_observer(self, observer: StepObserver | None) -> None:
        """Unused: logit policies run inside vLLM's engine process (see logits.py), whatever
        the request's steering mode."""
        return None

    def stats(self) -> EngineStats:
        s = self._stats
        return EngineStats(num_running=len(self._live), max_running_seen=s.max_running_seen,
                           generated_tokens=s.generated_tokens)  # fmt: skip


def guided(request: GenerationRequest) -> OutputConstraint | None:
    """The constraint vLLM's guided decoding applies: tool calls under `auto` (an optional
    grammar) go free here, as vLLM's guided decoding did not end free text where the torch
    engine's grammar and the model do."""
    constraint = request.constraint
    return None if constraint is not None and constraint.optional else constraint


def structured_outputs(constraint: OutputConstraint | None) -> StructuredOutputsParams | None:
    """A response_format or forced tool call as vLLM's guided decoding (the guidance backend:
    the tool-call Lark grammar with its embedded %json schema goes through as a grammar)."""
    if constraint is None:
        return None
    kind = {"json_object": "json_object", "json_schema": "json", "lark": "grammar",
            "regex": "regex"}[constraint.kind]  # fmt: skip
    return StructuredOutputsParams(**{kind: True if kind == "json_object" else constraint.spec})


def _finish_reason(reason: str | None) -> str:
    """vLLM's finish reasons are the engine's own ("stop", "length", "abort"); an error too."""
    return reason if reason in ("stop", "length", "abort") else "error"


def _logprobs(token_ids: list[int], entries: list | None, top: int | None) -> list | None:
    """vLLM's per-token {token id: Logprob} as TokenLogprobs: the sampled token's logprob and
    the `top` most likely alternatives by rank."""
    if top is None or entries is None:
        return None
    out = []
    for token_id, entry in zip(token_ids, entries, strict=True):
        ranked = sorted(entry.items(), key=lambda item: item[1].rank)[:top]
        out.append(TokenLogprob(token_id, entry[token_id].logprob,
                                [(i, lp.logprob) for i, lp in ranked]))  # fmt: skip
    return out
