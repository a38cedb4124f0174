"""FakeEngine: the Engine contract with deterministic tokens and a settable step time.

A stand-in for the plumbing tests only (routes, errors, streaming, cancellation, batching): it
runs no model, so those tests don't pay for one and can set the engine's speed. Tokens come from
a per-request generator seeded by the request's seed (greedy or unseeded: by its prompt), drawn
from the checkpoint tokenizer's plain-word tokens, so a request gives the same text every time
and the text reads as words. Every `step_s` seconds one step appends a token to every running
request (continuous batching: stats().max_running_seen counts the batch). Past max_num_seqs +
max_queue_len requests it answers 429, as the engine's full queue does.

Select it in a config with `engine: {kind: "tests.fakes.engine:FakeEngine"}`; the environment
variable FAKE_ENGINE_STEP_S sets the step time (default 0.002 s).
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from models.engine.config import EngineConfig
from models.protocol.engine import Engine, EngineCapabilities
from models.protocol.errors import (
    AdapterNotFoundError,
    EngineError,
    EngineOverloadedError,
    PromptTooLongError,
    VectorNotFoundError,
)
from models.protocol.outputs import EngineStats, RequestOutput, TokenLogprob
from models.protocol.requests import GenerationRequest
from models.protocol.steering import StepObserver


@dataclass
class _Row:
    request: GenerationRequest
    token_ids: list[int]  # the whole completion, decided at admission
    texts: list[str]  # text of each token's step; their join is the completion
    finish_reason: str
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    sent: int = 0
    aborted: bool = False


class FakeEngine(Engine):
    """Deterministic tokens at a set pace; no model (see the module docstring)."""

    name = "fake"
    capabilities = EngineCapabilities.all()  # the plumbing tests refuse nothing by capability

    def __init__(self, config: EngineConfig, model_path: str | Path, step_s: float | None = None):
        from transformers import AutoConfig, AutoTokenizer

        self.config = config
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_path))
        model = AutoConfig.from_pretrained(str(model_path))
        self.vocab_size = model.vocab_size
        self.max_model_len = config.max_model_len or model.max_position_embeddings
        self.step_s = float(os.environ.get("FAKE_ENGINE_STEP_S", 0.002)) if step_s is None else step_s
        self.words = self._word_tokens()
        self.rows: dict[str, _Row] = {}
        self.loaded_adapters: dict[str, str] = {}
        self.vectors: dict[str, torch.Tensor] = {}
        self.observer: StepObserver | None = None
        self._stats = EngineStats()
        self._stepper: asyncio.Task | None = None
        self._wake = asyncio.Event()

    def _word_tokens(self) -> list[int]:
        vocab = self.tokenizer.get_vocab()
        ids = sorted(i for i in vocab.values() if i < self.vocab_size
                     and re.fullmatch(r" ?[a-z]{2,}", self.tokenizer.decode([i])))  # fmt: skip
        return ids or list(range(self.vocab_size))

    async def start(self) -> None:
        if self._stepper is None:
            self._stepper = asyncio.create_task(self._step_forever())

    async def generate(self, request: GenerationRequest) -> AsyncIterator[RequestOutput]:
        await self.start()
        self.check_request(request)
        row = self._completion(request)
        self.rows[request.request_id] = row
        self._wake.set()
        finished = False
        try:
            while not finished:
                out = await row.queue.get()
                finished = out.finished
                yield out
        finally:
            row.aborted = True
            self.rows.pop(request.request_id, None)

    def check_request(self, request: GenerationRequest) -> None:
        params, prompt = request.params, request.prompt_token_ids
        if not prompt:
            raise EngineError("the prompt is empty", param="prompt")
        if params.max_tokens < 1:
            raise EngineError(f"max_tokens must be >= 1, got {params.max_tokens}", "max_tokens")
        if max(prompt) >= self.vocab_size or min(prompt) < 0:
            raise EngineError(f"prompt token ids must lie in [0, {self.vocab_size})", "prompt")
        if len(prompt) + params.max_tokens > self.max_model_len:
            raise PromptTooLongError(f"the prompt plus max_tokens exceeds {self.max_model_len}")
        if request.adapter and request.adapter not in self.loaded_adapters:
            raise AdapterNotFoundError.naming(request.adapter, self.loaded_adapters, "adapter")
        for spec in request.steer_vectors:
            if spec.name not in self.vectors:
                raise VectorNotFoundError.naming(spec.name, self.vectors, "steering.vectors")
        if request.steering is not None:
            raise EngineError("the fake engine runs no steering policies", param="steering")
        if len(self.rows) >= self.config.max_num_seqs + self.config.max_queue_len:
            raise EngineOverloadedError("the engine queue is full; retry later")

    def _completion(self, request: GenerationRequest) -> _Row:
        """The whole completion, decided at admission: tokens, each one's text, why it ends."""
        params = request.params
        prompt_key = zlib.crc32(str(request.prompt_token_ids).encode())
        if params.temperature == 0:
            rng = random.Random(prompt_key)
        else:
            rng = random.Random(None if params.seed is None else params.seed ^ prompt_key)
        ids = [rng.choice(self.words) for _ in range(params.max_tokens)]
        texts = [self.tokenizer.decode(ids[: i + 1]) for i in range(len(ids))]
        pieces = [t[len(texts[i - 1]) if i else 0 :] for i, t in enumerate(texts)]
        cuts = [texts[-1].index(s) for s in params.stop if s in texts[-1]]
        if not cuts:
            return _Row(request, ids, pieces, "length")
        end = min(cuts)  # the text stops before the stop string, inside token `last`
        last = next(i for i, t in enumerate(texts) if len(t) >= end)
        before = len(texts[last - 1]) if last else 0
        pieces = pieces[:last] + [pieces[last][: end - before]]
        return _Row(request, ids[: last + 1], pieces, "stop")

    async def _step_forever(self) -> None:
        while True:
            if not self.rows:
                self._wake.clear()
                await self._wake.wait()
            await asyncio.sleep(self.step_s)
            running = [r for r in self.rows.values() if not r.aborted]
            self._stats.steps += 1
            self._stats.max_running_seen = max(self._stats.max_running_seen, len(running))
            for row in running:
                row.queue.put_nowait(self._next_output(row))

    def _next_output(self, row: _Row) -> RequestOutput:
        i = row.sent
        row.sent += 1
        self._stats.generated_tokens += 1
        done = row.sent == len(row.token_ids)
        logprobs = None
        if row.request.params.logprobs is not None:
            top = [(row.token_ids[i], -0.1)] + [
                (t, -2.0 - k) for k, t in enumerate(self.words[: row.request.params.logprobs])
            ]
            logprobs = [TokenLogprob(row.token_ids[i], -0.1, top[: row.request.params.logprobs])]
        if done:
            row.aborted = True
        return RequestOutput(
            row.request.request_id, [row.token_ids[i]], row.texts[i], finished=done,
            finish_reason=row.finish_reason if done else None, logprobs=logprobs,
            num_prompt_tokens=len(row.request.prompt_token_ids), num_generated_tokens=row.sent,
        )  # fmt: skip

    async def abort(self, request_id: str) -> None:
        row = self.rows.get(request_id)
        if row is not None and not row.aborted:
            row.aborted = True
            row.queue.put_nowait(RequestOutput(request_id, [], "", True, "abort"))

    async def check_health(self) -> None:
        if self._stepper is not None and self._stepper.done():
            raise EngineError("the fake engine's stepper stopped")

    async def load_adapter(self, name: str, path: str) -> None:
        if not (Path(path) / "adapter_config.json").is_file():
            raise EngineError(f"'{path}' is not a PEFT adapter directory", param="lora_path")
        self.loaded_adapters[name] = path

    async def unload_adapter(self, name: str) -> None:
        if name not in self.loaded_adapters:
            raise AdapterNotFoundError.naming(name, self.loaded_adapters)
        del self.loaded_adapters[name]

    def adapters(self) -> list[str]:
        return sorted(self.loaded_adapters)

    def register_vector(self, name: str, vector: torch.Tensor) -> None:
        self.vectors[name] = vector

    def set_step_observer(self, observer: StepObserver | None) -> None:
        self.observer = observer

    def stats(self) -> EngineStats:
        s = self._stats
        s.num_running = len(self.rows)
        return EngineStats(**vars(s))
