"""Probe: a linear probe on the big model's own residual stream decides when to steer.

The engine captures the residual stream at `hidden_layers` inside its step (ForwardPass.hidden);
a logistic regression trained at start on labelled prompt sets (like steering vectors are
extracted from prompt pairs) turns it into P(concept) every step, for all rows at once. Above
`threshold` the policy acts once: turns on a steering vector, takes back the last tokens, or
forces tokens. No small-model forward is needed: the decision costs one small matmul.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from models.protocol.steering import (
    Action,
    Backtrack,
    ClearSteer,
    EmitError,
    Event,
    ForceTokens,
    ForwardPass,
    Prefilled,
    SteerVector,
)
from models.steering.policies.base import Policy
from models.steering.state import RequestState


class ProbeParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    hidden_layers: list[int] = Field(
        min_length=1, description="Big-model layers the probe reads (their residual streams, "
        "concatenated); the engine captures them for every row of this policy.",
    )  # fmt: skip
    hidden_prompt_positions: int = Field(
        1, ge=1, description="Prompt tokens whose states the prefill hands over (engine "
        "param): set it to `window` so a decision at the prompt reads as many as later ones.",
    )  # fmt: skip
    positive: list[str] = Field(
        default_factory=list, description="Prompts showing the concept (label 1); empty = "
        "the steering vector's negative pairs (what the vector steers away from).",
    )  # fmt: skip
    negative: list[str] = Field(
        default_factory=list, description="Prompts without it (label 0); empty = the vector's "
        "positive pairs.",
    )  # fmt: skip
    train_positions: int = Field(
        32, ge=1, description="Last tokens of each training prompt used as examples."
    )
    l2: float = Field(1e-2, ge=0, description="L2 penalty of the logistic regression.")
    threshold: float = Field(0.5, gt=0, lt=1, description="P(concept) above which it acts.")
    window: int = Field(
        16, ge=1, description="Positions whose probabilities are averaged: the prompt's last "
        "(set `hidden_prompt_positions` as large to have the prefill read them) and the "
        "generated ones since.",
    )  # fmt: skip
    action: Literal["steer", "backtrack", "force"] = Field(
        "steer", description="steer: turn on `vector`; backtrack: also take back `backtrack` "
        "tokens; force: append `force_text` instead of sampling.",
    )  # fmt: skip
    vector: str | None = Field(None, description="Big-model steering vector to turn on.")
    coeff: float = Field(4.0, description="Its coefficient: h_l += coeff * v_l.")
    layers: list[int] | None = Field(None, description="Its layers; None = all it has.")
    backtrack: int = Field(0, ge=0, description="Tokens to take back (action backtrack).")
    force_text: str = Field("", description="Text forced on firing (action force).")
    release_below: float | None = Field(
        None, description="Turn the vector off again when P(concept) falls below this."
    )


@dataclass
class LinearProbe:
    """P(concept | h) = sigmoid(w . (h - mean) / std + b) over features h [..., dim]."""

    weight: torch.Tensor
    bias: float
    mean: torch.Tensor
    std: torch.Tensor

    def probability(self, features: torch.Tensor) -> torch.Tensor:
        f = (features.float() - self.mean.to(features.device)) / self.std.to(features.device)
        return torch.sigmoid(f @ self.weight.to(features.device) + self.bias)

    def to_dict(self) -> dict[str, Any]:
        return {"weight": self.weight.tolist(), "bias": self.bias, "mean": self.mean.tolist(),
                "std": self.std.tolist()}  # fmt: skip


def train_probe(features: torch.Tensor, labels: torch.Tensor, l2: float = 1e-2) -> LinearProbe:
    """Logistic regression (standardised features, L2 penalty, L-BFGS, deterministic).
    features [n, dim], labels [n] in {0, 1}."""
    x = features.double()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    x = (x - mean) / std
    y = labels.double()
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, y)
        loss = loss + l2 * w.dot(w) / 2
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return LinearProbe(w.detach().float(), float(b.detach()), mean.float(), std.float())


def block_outputs(model: Any, tokenizer: Any, texts: list[str], layers: list[int]) -> list[torch.Tensor]:
    """Per text, the residual stream after the decoder blocks `layers` of a transformers causal
    LM, concatenated: [tokens, len(layers) * hidden] (block outputs, as the engine captures
    them; a forward's hidden_states[-1] would be normed)."""
    from models.steering.vectors import _decoder_blocks

    blocks = _decoder_blocks(model)
    bad = [x for x in layers if not 0 <= x < len(blocks)]
    if bad:
        raise ValueError(f"hidden_layers {bad} outside the big model's blocks 0..{len(blocks) - 1}")
    kept: dict[int, torch.Tensor] = {}

    def keep(layer: int):
        def hook(_module, _inputs, output):
            kept[layer] = (output[0] if isinstance(output, tuple) else output)[0].float()

        return hook

    handles = [blocks[x].register_forward_hook(keep(x)) for x in layers]
    out = []
    try:
        with torch.no_grad():
            for text in texts:
                ids = tokenizer(text, return_tensors="pt").input_ids
                model(input_ids=ids.to(next(model.parameters()).device))
                out.append(torch.cat([kept[x].cpu() for x in layers], dim=-1))
    finally:
        for handle in handles:
            handle.remove()
    return out


def fit_probe(name: str, p: ProbeParams, spec: Any, model: Any, tokenizer: Any) -> LinearProbe:
    """The probe of policy `name` trained on a transformers big model: on `p.positive` /
    `p.negative`, or else on the pairs of steering vector `spec` (a VectorConfig or None; its
    negative prompts are the concept watched for)."""
    positive = p.positive or (spec.negative if spec else [])
    negative = p.negative or (spec.positive if spec else [])
    if not positive or not negative:
        raise ValueError(
            f"policy '{name}' needs labelled prompts: give params.positive and "
            f"params.negative, or pairs on steering vector '{p.vector}'"
        )
    features, labels = [], []
    for label, texts in ((1.0, positive), (0.0, negative)):
        for states in block_outputs(model, tokenizer, list(texts), p.hidden_layers):
            tail = states[-p.train_positions :]
            features.append(tail)
            labels += [label] * tail.shape[0]
    return train_probe(torch.cat(features), torch.tensor(labels), p.l2)


class Probe(Policy):
    """Reads ForwardPass.hidden (the big model's residual stream at `hidden_layers`), scores
    P(concept) with a linear probe trained at start, and above `threshold` acts once."""

    Params = ProbeParams

    def start(self) -> None:
        p = self.defaults
        spec = self.context.vectors.get(p.vector) if p.vector else None
        if p.action in ("steer", "backtrack") and p.vector is None:
            raise ValueError(f"policy '{self.name}': action '{p.action}' needs params.vector")
        if self.context.big_model_path is None:
            raise ValueError(f"policy '{self.name}' trains on the big model; none is known")
        from models.steering.vectors import load_transformers_model

        model, tokenizer = load_transformers_model(self.context.big_model_path)
        self.force_ids: list[int] = tokenizer(p.force_text).input_ids if p.force_text else []
        if p.action == "force" and not self.force_ids:
            raise ValueError(f"policy '{self.name}': action 'force' needs params.force_text")
        self.probe = fit_probe(self.name, p, spec, model, tokenizer)

    def decide(self, rows: list[tuple[RequestState, list[Event]]]) -> list[list[Action]]:
        """One probe matmul for every hidden state of the step's rows (the prompt's last
        positions at Prefilled, the sampled-from position at each ForwardPass)."""
        actions: list[list[Action]] = [[] for _ in rows]
        states, owners = [], []  # features [positions, layers, hidden] and (row, prompt?)
        for i, (_, events) in enumerate(rows):
            for event in events:
                if isinstance(event, Prefilled) and event.hidden is not None:
                    states.append(event.hidden[:-1])  # its last is ForwardPass(0)'s
                    owners.append((i, True))
                elif isinstance(event, ForwardPass) and event.hidden is None:
                    actions[i] = [EmitError(
                        f"policy '{self.name}' reads the big model's hidden states at layers "
                        f"{self.defaults.hidden_layers}, but the engine sent none (steering "
                        "params without hidden_layers, or an engine without hidden-state capture)"
                    )]  # fmt: skip
                    break
                elif isinstance(event, ForwardPass):
                    states.append(event.hidden[None])
                    owners.append((i, False))
        if not states:
            return actions
        want = len(self.defaults.hidden_layers)
        if any(h.shape[1] != want for h in states):
            shapes = sorted({tuple(h.shape[1:]) for h in states})
            raise ValueError(f"policy '{self.name}' reads {want} layers; the engine sent {shapes}")
        features = torch.cat([h.reshape(h.shape[0], -1) for h in states])
        probabilities = self.probe.probability(features).tolist()  # one sync for the step
        seen: dict[int, list[float]] = {}
        start = 0
        for h, (i, _) in zip(states, owners, strict=True):
            seen.setdefault(i, []).extend(probabilities[start : start + h.shape[0]])
            start += h.shape[0]
        for i, probs in seen.items():
            if not actions[i]:  # (a row answered with an error above is done)
                actions[i] = self._act(rows[i][0], probs)
        return actions

    def on_event(self, state: RequestState, event: Event) -> list[Action]:
        return self.decide([(state, [event])])[0]

    def _act(self, state: RequestState, probabilities: list[float]) -> list[Action]:
        p = state.params
        recent: deque = state.scratch.setdefault("recent", deque(maxlen=p.window))
        recent.extend(probabilities)
        score = sum(recent) / len(recent)
        state.scratch["score"] = score
        active = state.scratch.get("active", False)
        if not active and score > p.threshold:
            state.scratch["active"] = True
            if p.action == "force":
                return [ForceTokens(list(self.force_ids))]
            out: list[Action] = [SteerVector(p.vector, p.coeff, p.layers)]
            n = min(p.backtrack, state.max_backtrack, state.next_step)
            if p.action == "backtrack" and n:
                out.append(Backtrack(n))
            return out
        if active and p.release_below is not None and score < p.release_below:
            state.scratch["active"] = False
            return [ClearSteer(p.vector)] if p.action != "force" else []
        return []
