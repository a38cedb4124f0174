"""ExLlamaV2Engine: exllamav2 behind the Engine contract (CUDA only; FP16 HF or EXL2 checkpoints).

The forward runs module by module (seed 000's intervention loop): after the decoder layers a
request steers, h_l += c * v_l is added to the residual stream, then the next module runs.
exllamav2 keeps its own KV cache; this engine serves one request at a time on it (no continuous
batching: what exllamav2 is for here is one quantized model on one card), on a worker thread so
the event loop stays free. Sampling is the torch engine's (models.engine.sampler), so seeds,
temperature, top-k/top-p, logit bias and logprobs behave the same. Adapters are exllamav2 LoRAs.

It can do hidden-state steering (steer_vectors); step-observer policies, backtrack, logit
policies and adapter mixes are refused by capability (a 400 naming exllamav2).

`import exllamav2` JIT-compiles its CUDA extension (about 110 s on an H200 with MAX_JOBS=16
TORCH_CUDA_ARCH_LIST=9.0) and fails on a CPU-only torch with OSError.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from exllamav2 import ExLlamaV2, ExLlamaV2Cache, ExLlamaV2Config, ExLlamaV2Lora
from exllamav2.attn import ExLlamaV2Attention
from exllamav2.compat import safe_move_tensor
from exllamav2.device import set_device_streams
from exllamav2.mlp import ExLlamaV2MLP
from exllamav2.parallel_decoder import ExLlamaV2ParallelDecoder

from models.engine.admission import check_generation
from models.engine.config import EngineConfig
from models.engine.llm_engine import eos_token_ids, load_tokenizer
from models.engine.sampler import sample
from models.engines.vectors import check_vectors, vector_deltas
from models.protocol.engine import Engine, EngineCapabilities, check_capabilities
from models.protocol.errors import AdapterNotFoundError
from models.protocol.outputs import EngineStats, RequestOutput
from models.protocol.requests import GenerationRequest
from models.protocol.steering import StepObserver


class SteeredForward:
    """exllamav2's forward, module by module, adding per-layer deltas to the hidden states."""

    def __init__(self, model: ExLlamaV2):
        self.model = model
        self.after_layer = {
            i: m.layer_idx for i, m in enumerate(model.modules)
            if isinstance(m, (ExLlamaV2MLP, ExLlamaV2ParallelDecoder))
        }  # fmt: skip
        self.num_layers = len(self.after_layer)

    @torch.inference_mode()
    def __call__(self, ids: torch.Tensor, cache: ExLlamaV2Cache,
                 deltas: dict[int, torch.Tensor] | None = None, loras: list | None = None,
                 ) -> torch.Tensor:  # fmt: skip
        """Last-position logits [batch, vocab] (float32) for ids [batch, new tokens] appended
        to `cache`; deltas: layer -> [hidden] (or [batch, 1, hidden]) added after that layer."""
        model = self.model
        batch, length = ids.shape
        past = cache.current_seq_len
        params = ExLlamaV2Attention.Params(batch, length, past, None, None)
        set_device_streams()  # per thread, as ExLlamaV2.forward_chunk (this runs in to_thread)
        first = model.modules[0].device_idx  # the embedding: -1 (CPU) after load_autosplit
        x = ids
        for idx, module in enumerate(model.modules):
            if idx == model.head_layer_idx:
                x = x.narrow(-2, -1, 1)
            if module.device_idx is not None and module.device_idx != first and (
                    module.device_idx >= 0):  # fmt: skip
                x = safe_move_tensor(x, module.device_idx, non_blocking=True)
            x = module.forward(x, cache=cache, attn_params=params, past_len=past, loras=loras)
            layer = self.after_layer.get(idx)
            if deltas and layer in deltas:
                x.add_(deltas[layer].to(x.device, x.dtype))  # no copy on one GPU
        cache.current_seq_len += length
        return x[:, -1, : model.config.vocab_size].float()


class ExLlamaV2Engine(Engine):
    """exllamav2 behind the Engine contract (see the module docstring)."""

    name = "exllamav2"
    capabilities = EngineCapabilities(hidden_state_steering=True)

    def __init__(self, config: EngineConfig, model_path: str | Path, steering: Any = None,
                 batch_size: int = 1):  # fmt: skip
        self.config = config
        ex_config = ExLlamaV2Config(str(model_path))
        if config.max_model_len:
            ex_config.max_seq_len = config.max_model_len
        self.max_model_len = ex_config.max_seq_len
        self.model = ExLlamaV2(ex_config)
        self.cache = ExLlamaV2Cache(self.model, batch_size=batch_size,
                                    max_seq_len=self.max_model_len, lazy=True)  # fmt: skip
        self.model.load_autosplit(self.cache)
        self.forward = SteeredForward(self.model)
        self.tokenizer = load_tokenizer(model_path)
        self.vocab_size = ex_config.vocab_size
        self.eos = eos_token_ids(model_path)
        self.vectors: dict[str, torch.Tensor] = {}
        self.loras: dict[str, ExLlamaV2Lora] = {}
        self._lock = asyncio.Lock()  # one request at a time on the one cache
        self._seeds = random.Random(config.seed)
        self._aborted: set[str] = set()
        self._stats = EngineStats()

    async def start(self) -> None:
        return None

    def check_request(self, request: GenerationRequest) -> None:
        check_capabilities(self, request)  # also when used without a Generator
        check_generation(request, self.vocab_size, self.max_model_len)
        check_vectors(request, self.vectors, self.forward.num_layers)
        if request.adapter is not None and request.adapter not in self.loras:
            raise AdapterNotFoundError.naming(request.adapter, self.loras, param="model")

    def deltas(self, request: GenerationRequest) -> dict[int, torch.Tensor]:
        """layer -> sum of c * v_l over the request's steering vectors."""
        out = vector_deltas(request, self.vectors)
        # on the GPU the layers run on (exllamav2 may keep the embedding table in CPU memory)
        device = self.model.modules[self.model.head_layer_idx].device()
        return {layer: d.to(device, torch.float16) for layer, d in out.items()}

    async def generate(self, request: GenerationRequest) -> AsyncIterator[RequestOutput]:
        self.check_request(request)
        async with self._lock:
            async for out in self._generate(request):
                yield out

    async def _generate(self, request: GenerationRequest) -> AsyncIterator[RequestOutput]:
        p, rid = request.params, request.request_id
        seed = p.seed if p.seed is not None else self._seeds.randrange(1 << 62)
        row = SimpleNamespace(request=request,
                              generator=torch.Generator(device="cuda").manual_seed(seed))
        deltas = self.deltas(request)
        loras = [self.loras[request.adapter]] if request.adapter else None
        self.cache.current_seq_len = 0
        prompt = torch.tensor([request.prompt_token_ids], dtype=torch.long)
        chunk = self.model.config.max_input_len  # the longest input one forward takes
        for start in range(0, prompt.shape[1] - chunk, chunk):  # all but the last chunk
            await asyncio.to_thread(self.forward, prompt[:, start:start + chunk], self.cache,
                                    deltas, loras)  # fmt: skip
        ids = prompt[:, (prompt.shape[1] - 1) // chunk * chunk:]
        generated: list[int] = []
        sent = ""
        self._stats.num_running = 1
        try:
            while True:
                logits = await asyncio.to_thread(self.forward, ids, self.cache, deltas, loras)
                token, logprob = sample(logits, [row])[0]
                generated.append(token)
                self._stats.generated_tokens += 1
                text = self.tokenizer.decode(generated, skip_special_tokens=True)
                reason = self._finish(p, token, generated, text, rid)
                if reason == "stop" and p.stop:
                    text = _cut_at_stop(text, p.stop)
                final = text if reason else text[: len(text) - _held(text, p.stop)]
                yield RequestOutput(rid, [token], final[len(sent):], reason is not None, reason,
                                    [logprob] if logprob else None,
                                    len(request.prompt_token_ids), len(generated))  # fmt: skip
                sent = final
                if reason:
                    return
                ids = torch.tensor([[token]], dtype=torch.long)
        finally:
            self._aborted.discard(rid)
            self._stats.num_running = 0

    def _finish(self, p, token: int, generated: list[int], text: str, rid: str) -> str | None:
        if rid in self._aborted:
            return "abort"
        if (token in self.eos and not p.ignore_eos) or token in p.stop_token_ids:
            return "stop"
        if any(s in text for s in p.stop):
            return "stop"
        if len(generated) >= p.max_tokens:
            return "length"
        return None

    async def abort(self, request_id: str) -> None:
        self._aborted.add(request_id)

    async def check_health(self) -> None:
        return None

    async def load_adapter(self, name: str, path: str) -> None:
        self.loras[name] = await asyncio.to_thread(ExLlamaV2Lora.from_directory, self.model, path)

    async def unload_adapter(self, name: str) -> None:
        lora = self.loras.pop(name, None)
        if lora is None:
            raise AdapterNotFoundError.naming(name, self.loras)
        lora.unload()

    def adapters(self) -> list[str]:
        return sorted(self.loras)

    def register_vector(self, name: str, vector: torch.Tensor) -> None:
        self.vectors[name] = vector

    def set_step_observer(self, observer: StepObserver | None) -> None:
        return None  # step-observer policies are refused by capability (token_events)

    def stats(self) -> EngineStats:
        return EngineStats(**vars(self._stats))


def _cut_at_stop(text: str, stops: list[str]) -> str:
    """`text` up to the first stop string in it (whole when none is: an EOS stop)."""
    return text[: min([text.find(s) for s in stops if s in text], default=len(text))]


def _held(text: str, stops: list[str]) -> int:
    """Characters at the end of `text` that could still begin a stop string (held back)."""
    return max([n for s in stops for n in range(1, len(s)) if text.endswith(s[:n])], default=0)
