"""Activations for clients: `tandem.activations` in a request asks, per generated token, for
the big model's residual stream at chosen `layers` (base64 of little-endian float16 bytes
[layers, hidden_size]), the scores of named `probes` (P(concept) of the configured probe
policies' linear probes, per token), and its top `features` SAE features; each choice's tokens
come back with theirs (None for a token a policy forced) in the response's and the stream's
`tandem.activations`. The engine captures the union of the layers these need; the probes and
the SAE read them here, at the API edge. Bounded: at most MAX_LAYERS layers asked and
MAX_ACTIVATION_VECTORS captured vectors (captured layers x max_tokens x n) per request, else
a 400."""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import AsyncIterator
from typing import Any

import torch

from models.activations.reader import ActivationReader, ActivationRequestError, ClientProbe
from models.activations.store import ActivationStore, token_rows
from models.openai.errors import OpenAIError
from models.protocol.outputs import RequestOutput

logger = logging.getLogger("tandem.activations")

MAX_LAYERS = 8
MAX_ACTIVATION_VECTORS = 8192  # 8192 x 2048 x 2 bytes = 32 MiB of raw vectors at most


class ActivationPlan(list):
    """What a request reads of its tokens' states. The list itself is the layers the engine
    captures (the raw `layers` asked first, then those the probes and the SAE read); the
    attributes say what goes back: raw vectors of `layers`, scores of `probes`, the top
    `features` SAE features (0 = none); `store`: the request's rows go to the store too."""

    def __init__(self, layers: list[int], probes: list[ClientProbe],
                 reader: ActivationReader | None = None, features: int = 0,
                 store: bool = False):  # fmt: skip
        captured = list(layers)
        needed = [x for p in probes for x in p.layers]
        needed += [reader.sae.layer] if features and reader and reader.sae else []
        captured += [x for x in dict.fromkeys(needed) if x not in captured]
        super().__init__(captured)
        self.layers, self.probes, self.reader = list(layers), probes, reader
        self.features, self.store = features, store

    def read(self, index: int, hidden: list) -> dict[str, Any]:
        """One choice's activations object for these tokens' states [captured, hidden] (host
        tensors, or None for a forced token)."""
        out: dict[str, Any] = {"index": index}
        present = [i for i, h in enumerate(hidden) if h is not None]
        states = torch.stack([hidden[i].float() for i in present]) if present else None

        def per_token(values: list) -> list:
            full: list = [None] * len(hidden)
            for i, v in zip(present, values, strict=True):
                full[i] = v
            return full

        if self.layers:
            rows = [self.index(x) for x in self.layers]
            shape = [len(self.layers), hidden[present[0]].shape[-1] if present else 0]
            out.update(layers=self.layers, dtype="float16", shape=shape, tokens=[
                None if h is None else base64.b64encode(h[rows].half().numpy().tobytes()).decode()
                for h in hidden])  # fmt: skip
        if self.probes:
            out["probes"] = {p.name: per_token([round(s, 5) for s in p.scores(states, list(self))]
                                               if states is not None else [])
                             for p in self.probes}  # fmt: skip
        if self.features and self.reader is not None:
            picked = states[:, self.index(self.reader.sae.layer)] if states is not None else None
            out["features"] = per_token(
                self.reader.features(picked, self.features) if picked is not None else [])
        return out


async def activation_plan(req: Any, max_tokens: int, reader: ActivationReader | None,
                          store: ActivationStore | None = None) -> ActivationPlan:  # fmt: skip
    """What a request reads (SamplingFields.tandem), checked: an empty plan when nothing."""
    options = req.tandem.activations if req.tandem is not None else None
    if options is None:
        return ActivationPlan([], [])
    try:
        if options.store and store is None:
            raise ActivationRequestError("this server has no activation store "
                                         "(activation_store.dir)", "tandem.activations.store")
        if (options.probes or options.features) and reader is None:
            raise ActivationRequestError("this server has no probes or SAE configured",
                                         "tandem.activations")  # fmt: skip
        if reader is not None:
            reader.probe_layers(options.probes)  # unknown names first, before any training
            if options.features:
                reader.check_features(options.features, "tandem.activations.features")
        probes = await reader.probes(options.probes) if options.probes else []
    except ActivationRequestError as exc:
        raise OpenAIError(str(exc), 400, param=exc.param, code=exc.code) from None
    plan = ActivationPlan(options.layers, probes, reader, options.features, options.store)
    vectors = len(plan) * max_tokens * req.n
    if vectors > MAX_ACTIVATION_VECTORS:
        raise OpenAIError(
            f"tandem.activations reads {len(plan)} layers x {max_tokens} tokens x n={req.n} = "
            f"{vectors} captured vectors; at most {MAX_ACTIVATION_VECTORS} per request: ask for "
            "fewer layers, probes or tokens",
            param="tandem.activations",
        )
    return plan


def choice_activations(index: int, plan: list[int], hidden: list) -> dict[str, Any]:
    """One choice's activations object for these tokens' states (a plain list of layers:
    raw vectors of all of them)."""
    plan = plan if isinstance(plan, ActivationPlan) else ActivationPlan(plan, [])
    return plan.read(index, hidden)


def all_activations(plan: list[int], choices: list) -> list[dict[str, Any]] | None:
    """The response's `tandem.activations`: one object per choice (None: none asked)."""
    if not plan:
        return None
    return [choice_activations(i, plan, c.hidden) for i, c in enumerate(choices)]


class StoreRecorder:
    """Records a request's choices as they stream (token ids, states) and, once every choice
    ended, writes their rows to the activation store (models/activations/store.py): the same
    scores and features the response carries. The write runs in a thread before the last
    output goes on, so a finished response is on disk; a failed write is logged, never the
    request's error."""

    def __init__(self, store: ActivationStore, request_id: str, plan: ActivationPlan,
                 tokenizer: Any, choices: int):  # fmt: skip
        self.store, self.request_id, self.plan, self.tokenizer = store, request_id, plan, tokenizer
        self.ids: list[list[int]] = [[] for _ in range(choices)]
        self.hidden: list[list] = [[] for _ in range(choices)]
        self.left = choices

    async def wrap(self, index: int, outputs: AsyncIterator[RequestOutput]) -> AsyncIterator[RequestOutput]:
        try:
            async for out in outputs:
                self.ids[index] += out.token_ids
                self.hidden[index] += out.hidden or [None] * len(out.token_ids)
                if out.finished:
                    self.left -= 1
                    if self.left == 0:
                        await asyncio.to_thread(self._write)
                yield out
        finally:  # closing this closes the engine's stream (the request is aborted)
            if (aclose := getattr(outputs, "aclose", None)) is not None:
                await aclose()

    def _write(self) -> None:
        try:
            rows = []
            for i, (ids, hidden) in enumerate(zip(self.ids, self.hidden, strict=True)):
                tokens = [self.tokenizer.decode([t]) for t in ids]
                rows += token_rows(i, ids, tokens, self.plan.read(i, hidden))
            self.store.write(self.request_id, rows)
        except Exception:  # noqa: BLE001 - the store is a side output of the request
            logger.exception("activation store: request %s not stored", self.request_id)
