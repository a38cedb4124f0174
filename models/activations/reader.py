"""`ActivationReader`: what the API edge reads out of the big model's states for clients.

- Probes: every `probe` policy of the steering config is a probe clients may name; its linear
  probe is trained on first use exactly as the policy trains it (a transformers forward of the
  big model over the labelled prompts, in a thread), then kept.
- SAE features (`steering.sae`): top-k features of captured states, and of any text through a
  transformers forward (`/v1/features/extract`).
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass
from typing import Any

import torch

from models.steering.policies.probe import LinearProbe, ProbeParams, block_outputs, fit_probe
from models.steering.sae import SparseAutoencoder, sae_feature

MAX_TEXTS = 16  # /v1/features/extract: texts per call
MAX_TEXT_TOKENS = 1024  # tokens per text
MAX_TOP_K = 32  # features per token


class ActivationRequestError(ValueError):
    """A request for activations that cannot be served; `param` names the field."""

    def __init__(self, message: str, param: str, code: str = "invalid_value"):
        super().__init__(message)
        self.param, self.code = param, code


@dataclass
class ClientProbe:
    """A trained probe and the layers it reads (their states concatenated)."""

    name: str
    layers: list[int]
    probe: LinearProbe

    def scores(self, states: torch.Tensor, layers: list[int]) -> list[float]:
        """P(concept) per token of states [tokens, len(layers), hidden] captured at `layers`."""
        picked = states[:, [layers.index(x) for x in self.layers]]
        return self.probe.probability(picked.reshape(picked.shape[0], -1)).tolist()


class ActivationReader:
    """Probes and SAE features over the big model at `big_model_path` (see module doc)."""

    def __init__(self, big_model_path: str, probes: dict[str, ProbeParams],
                 vectors: dict[str, Any], sae: SparseAutoencoder | None = None):  # fmt: skip
        self.big_model_path = big_model_path
        self.probe_params, self.vectors, self.sae = probes, vectors, sae
        self._trained: dict[str, ClientProbe] = {}
        self._model: tuple[Any, Any] | None = None
        self._lock, self._train_lock = threading.Lock(), threading.Lock()

    @classmethod
    def from_steering(cls, steering: Any, big_model_path: str, hidden_size: int,
                      num_layers: int) -> ActivationReader:  # fmt: skip
        """From the `steering:` block: its probe policies, vectors (their pairs) and SAE."""
        from models.steering.sae import load_configured_sae

        probes = {p.name: ProbeParams.model_validate(p.params)
                  for p in steering.policies if p.kind == "probe"}  # fmt: skip
        sae = load_configured_sae(steering.sae, big_model_path, hidden_size, num_layers)
        return cls(big_model_path, probes, {v.name: v for v in steering.vectors}, sae)

    def model(self) -> tuple[Any, Any]:
        """(model, tokenizer) of the big model through transformers, loaded once (blocking)."""
        with self._lock:
            if self._model is None:
                from models.steering.vectors import load_transformers_model

                self._model = load_transformers_model(self.big_model_path)
            return self._model

    def probe_layers(self, names: list[str]) -> list[int]:
        """The layers the named probes read; ActivationRequestError for an unknown name."""
        unknown = [n for n in names if n not in self.probe_params]
        if unknown:
            raise ActivationRequestError(
                f"probe '{unknown[0]}' does not exist; configured probes (steering policies of "
                f"kind probe): {', '.join(sorted(self.probe_params)) or 'none'}",
                "tandem.activations.probes", "probe_not_found")  # fmt: skip
        return [x for n in names for x in self.probe_params[n].hidden_layers]

    async def probes(self, names: list[str]) -> list[ClientProbe]:
        """The named probes, trained on first use (in a thread: seconds on the toy model)."""
        self.probe_layers(names)
        missing = [n for n in names if n not in self._trained]
        if missing:
            await asyncio.to_thread(self._train, missing)
        return [self._trained[n] for n in names]

    def _train(self, names: list[str]) -> None:
        model, tokenizer = self.model()
        with self._train_lock:  # requests arriving together train a probe once
            for name in names:
                if name not in self._trained:
                    self._trained[name] = self._fit(name, model, tokenizer)

    def _fit(self, name: str, model: Any, tokenizer: Any) -> ClientProbe:
        p = self.probe_params[name]
        spec = self.vectors.get(p.vector) if p.vector else None
        return ClientProbe(name, list(p.hidden_layers), fit_probe(name, p, spec, model, tokenizer))

    def check_features(self, top_k: int, param: str) -> SparseAutoencoder:
        """The SAE, for `top_k` features per token; ActivationRequestError without one."""
        if self.sae is None:
            raise ActivationRequestError("SAE features need an SAE: set steering.sae in the "
                                         "config", param, "sae_not_configured")  # fmt: skip
        if not 1 <= top_k <= MAX_TOP_K:
            raise ActivationRequestError(f"top_k must lie in 1..{MAX_TOP_K}", param)
        return self.sae

    def features(self, states: torch.Tensor, top_k: int) -> list[list[dict[str, Any]]]:
        """Per token of SAE-layer states [tokens, hidden], its top_k features, strongest first:
        {"index", "name" (null unless named), "activation"}; features that do not fire are
        left out."""
        sae = self.check_features(top_k, "top_k")
        values, indices = sae.top_features(states, top_k)
        return [[{"index": i, "name": sae.name_of(i), "activation": round(v, 4)}
                 for v, i in zip(vs, ix, strict=True) if v > 0]
                for vs, ix in zip(values.tolist(), indices.tolist(), strict=True)]  # fmt: skip

    def extract(self, texts: list[str], top_k: int) -> list[dict[str, Any]]:
        """Per text, its tokens and each one's top_k SAE features (blocking: a forward)."""
        sae = self.check_features(top_k, "top_k")
        if not 1 <= len(texts) <= MAX_TEXTS:
            raise ActivationRequestError(f"input holds 1..{MAX_TEXTS} texts", "input")
        model, tokenizer = self.model()
        try:
            ids = [tokenizer(t).input_ids for t in texts]
        except (TypeError, ValueError) as exc:  # e.g. a lone surrogate in the JSON string
            raise ActivationRequestError(f"input cannot be tokenized: {exc}", "input") from None
        if too_long := [i for i, x in enumerate(ids) if not 1 <= len(x) <= MAX_TEXT_TOKENS]:
            raise ActivationRequestError(f"text {too_long[0]} has {len(ids[too_long[0]])} tokens; "
                                         f"each must have 1..{MAX_TEXT_TOKENS}", "input")  # fmt: skip
        out = []
        for i, (text, states) in enumerate(
                zip(texts, block_outputs(model, tokenizer, texts, [sae.layer]), strict=True)):
            tokens = [tokenizer.decode([t]) for t in ids[i]]
            feats = self.features(states, top_k)
            out.append({"index": i, "text": text, "tokens": [
                {"token": tok, "token_id": tid, "features": f}
                for tok, tid, f in zip(tokens, ids[i], feats, strict=True)]})  # fmt: skip
        return out

    def vector_feature(self, name: str) -> int | None:
        """The SAE feature a steering-vector name `sae:<name|index>` names, else None."""
        return sae_feature(self.sae, name)
