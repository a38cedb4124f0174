"""The adapter router: prompt -> LoRA adapter(s) of the big model, or the base model.

Prompts are embedded with all-MiniLM-L6-v2 and a classifier head, trained at start on the
adapters' example prompts (plus a 'base' class of generic prompts), gives each adapter a
probability. The best adapter wins when its probability reaches `RouterConfig.threshold` and
beats the base class; otherwise the request goes to the base model.

The base class is on by default because it measured better than the threshold alone: on
tests/data/router_heldout.jsonl 0.99 accuracy at threshold 0.5, against at best 0.87 (threshold
0.7) without it, since a softmax over adapters only is confident about chit-chat too.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from sklearn.linear_model import LogisticRegression

from models.embedding import Embedder, shared_embedder
from models.routing.base_prompts import GENERIC_PROMPTS
from models.routing.config import AdapterConfig, RouterConfig

# MiniLM reads only the first 256 word pieces, but a task's instruction may come before or after
# a long passage: longer prompts are routed on their head and tail. 300 characters each way
# measured best on long toy-world passages (accuracy 0.64 -> 0.78; unchanged on short prompts).
ROUTING_WINDOW_CHARS = 300


def routing_text(prompt: str) -> str:
    """What the router embeds: the prompt, or its head and tail when it is long."""
    if len(prompt) <= 2 * ROUTING_WINDOW_CHARS:
        return prompt
    return f"{prompt[:ROUTING_WINDOW_CHARS]} … {prompt[-ROUTING_WINDOW_CHARS:]}"


@dataclass
class RouteDecision:
    """Where one prompt goes.

    adapter: the chosen adapter, or None for the base model.
    confidence: probability of the best adapter (in [0, 1]); the value compared with the
        threshold, so a base decision made by the threshold has confidence < threshold.
    candidates: the top-k adapters with their probabilities, best first (also for base).
    weights: for top-k > 1, the chosen adapters' probabilities renormalised to sum to 1. The
        engine mixes them per row, weighted: nothing is merged per request (merging would
        rewrite weights for every new mix), rows with different mixes share one batch, and the
        weights can change with every request.
    """

    adapter: str | None
    confidence: float
    candidates: list[tuple[str, float]]
    weights: dict[str, float] | None = None

    def to_dict(self) -> dict:
        """Plain dict (JSON and Ray friendly)."""
        out = asdict(self)
        out["candidates"] = [list(c) for c in self.candidates]
        return out


class AdapterRouter:
    """Routes prompts to adapters with a MiniLM embedding and a logistic-regression head.

    Logistic regression rather than a torch head: with tens of examples per class on 384-dim
    normalised embeddings it is convex (same result every start), fits in milliseconds, and
    gives calibrated-enough probabilities for a threshold, with nothing to tune but C.

    0 adapters: every prompt goes to base and the embedder is never loaded. An adapter without
    examples can still be named explicitly but is never picked by the router. With exactly one
    routable adapter and no base class there is nothing to discriminate: its confidence is the
    best cosine similarity between the prompt and its examples.
    """

    def __init__(
        self,
        adapters: list[AdapterConfig],
        config: RouterConfig | None = None,
        embedder: Embedder | None = None,
    ):
        self.config = config or RouterConfig()
        self.adapters = list(adapters)
        names = [a.name for a in self.adapters]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"adapter names must be unique; repeated: {', '.join(duplicates)}")
        self.routable = [a for a in self.adapters if a.examples]
        self._head: LogisticRegression | None = None
        self._example_embeddings: np.ndarray | None = None
        self.embedder: Embedder | None = None
        if self.routable:
            self.embedder = embedder or shared_embedder()
            self._train()

    def _base_examples(self) -> list[str]:
        if not self.config.base_class:
            return []
        return [*GENERIC_PROMPTS, *self.config.base_examples]

    def _train(self) -> None:
        texts, labels = [], []
        for index, adapter in enumerate(self.routable):
            texts += adapter.examples
            labels += [index] * len(adapter.examples)
        base = self._base_examples()
        texts += base
        labels += [len(self.routable)] * len(base)
        embeddings = self.embedder.embed([routing_text(t) for t in texts])
        if len(set(labels)) == 1:
            self._example_embeddings = embeddings
            return
        self._head = LogisticRegression(C=self.config.regularization, max_iter=2000)
        self._head.fit(embeddings, np.array(labels))

    def adapter_probabilities(self, prompts: list[str]) -> tuple[np.ndarray, np.ndarray | None]:
        """Per prompt: probability of each routable adapter (B, n) and of base (B,) or None."""
        embeddings = self.embedder.embed([routing_text(p) for p in prompts])
        if self._head is None:
            similarity = embeddings @ self._example_embeddings.T
            return np.clip(similarity.max(axis=1, keepdims=True), 0.0, 1.0), None
        proba = self._head.predict_proba(embeddings)
        n = len(self.routable)
        return proba[:, :n], (proba[:, n] if proba.shape[1] > n else None)

    def route(self, prompts: list[str]) -> list[RouteDecision]:
        """Route a batch of prompts (one embedding call for all of them)."""
        if not prompts:
            return []
        if not self.routable:
            return [RouteDecision(adapter=None, confidence=0.0, candidates=[]) for _ in prompts]
        return self.decide(*self.adapter_probabilities(prompts))

    def decide(self, adapter_p: np.ndarray, base_p: np.ndarray | None) -> list[RouteDecision]:
        """Decisions from `adapter_probabilities` output, at the current config's threshold.

        Split from `route` so a caller can compare thresholds without embedding again.
        """
        return [
            self._decide_one(adapter_p[i], None if base_p is None else float(base_p[i]))
            for i in range(len(adapter_p))
        ]

    def _decide_one(self, adapter_p: np.ndarray, base_p: float | None) -> RouteDecision:
        order = np.argsort(-adapter_p)[: self.config.top_k]
        candidates = [(self.routable[j].name, float(adapter_p[j])) for j in order]
        best_name, best_p = candidates[0]
        if best_p < self.config.threshold or (base_p is not None and base_p > best_p):
            return RouteDecision(adapter=None, confidence=best_p, candidates=candidates)
        weights = None
        if len(candidates) > 1:
            total = sum(p for _, p in candidates)
            weights = {name: p / total for name, p in candidates}
        return RouteDecision(
            adapter=best_name, confidence=best_p, candidates=candidates, weights=weights
        )

    def info(self) -> list[dict]:
        """The adapters this router knows: name, path, description, examples, routable."""
        return [
            {
                "name": a.name,
                "path": a.path,
                "description": a.description,
                "num_examples": len(a.examples),
                "routable": bool(a.examples),
            }
            for a in self.adapters
        ]
