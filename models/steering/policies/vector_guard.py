"""Vector guard: the small model watches the running text for a concept and, once it shows,
turns on a steering vector in the big model (and may take back the last tokens)."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from models.protocol.steering import (
    MAX_STEER_COEFF,
    Action,
    Backtrack,
    ClearSteer,
    Event,
    Prefilled,
    SteerVector,
)
from models.steering.policies.base import MAX_BACKTRACK, Policy, PolicyParamsError, PolicySetting
from models.steering.state import BASE, RequestState

MAX_SCORE = 1e3  # concept scores sit near -1..1; past this a threshold is a typo
MAX_WINDOW = 1 << 16


class VectorGuardParams(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    vector: str = Field(description="Big-model steering vector to turn on (a registered name).")
    coeff: float = Field(
        4.0, ge=-MAX_STEER_COEFF, le=MAX_STEER_COEFF,
        description="Its coefficient: h_l += coeff * v_l (capped as static vectors are).",
    )  # fmt: skip
    layers: list[int] | None = Field(None, description="Big-model layers; None = all it has.")
    threshold: float = Field(
        0.5, ge=-MAX_SCORE, le=MAX_SCORE, description="Concept score (-1 = like the negative "
        "prompts, +1 = like the positive ones) above which the vector turns on.",
    )  # fmt: skip
    release_below: float | None = Field(
        None, ge=-MAX_SCORE, le=MAX_SCORE,
        description="Turn the vector off again when the score falls below this.",
    )  # fmt: skip
    backtrack: int = Field(
        0, ge=0, le=MAX_BACKTRACK, description="Generated tokens to take back on triggering; at "
        "most the request's `max_backtrack` (the tokens the engine holds back from the client).",
    )  # fmt: skip
    concept_layer: int | None = Field(
        None, description="Small-model block whose output is scored; None = the middle one."
    )
    pool: Literal["mean", "last"] = Field(
        "mean", description="Score the mean state of the last `window` tokens, or the last one."
    )
    window: int = Field(32, ge=1, le=MAX_WINDOW, description="Tokens of running text the mean covers.")
    positive: list[str] = Field(
        default_factory=list, description="Concept prompts; empty = the vector's positive pairs."
    )
    negative: list[str] = Field(
        default_factory=list, description="Counter prompts; empty = the vector's negative pairs."
    )


class VectorGuard(Policy):
    """Scores the running text with the small model's state at `concept_layer` (the mean over
    the last `window` tokens, or the last token's) against the concept: score = (h - midpoint)
    . d / (|d|^2 / 2) with d = mean(positive) - mean(negative) of the concept prompts pooled the
    same way, so +1 sits on the positive mean and -1 on the negative one. Above `threshold` it
    answers SteerVector(vector, coeff, layers) and, once, Backtrack(backtrack)."""

    Params = VectorGuardParams
    FIXED_PARAMS = ("concept_layer", "pool", "positive", "negative")  # the concept, made at start

    @classmethod
    def check_params(
        cls, name: str, params: BaseModel, defaults: dict, setting: PolicySetting
    ) -> None:
        top = setting.num_layers
        bad = [x for x in params.layers or [] if x < 0 or (top is not None and x >= top)]
        if bad:
            raise PolicyParamsError(
                f"steering.params.layers of policy '{name}': layers {bad} outside the big "
                f"model's 0..{top - 1 if top is not None else 'n'}",
                "steering.params.layers",
            )

    @classmethod
    def vectors_named(cls, params: BaseModel) -> list[str]:
        return [params.vector]
    needs = ("token_events", "hidden_state_steering")

    @property
    def variants(self) -> list[str]:
        return [BASE]

    @property
    def hidden_layers(self) -> list[int]:
        return [self.layer]

    def start(self) -> None:
        small = self.context.small_model
        if small is None:
            raise ValueError(f"policy '{self.name}' needs a small model; none is configured")
        p = self.defaults
        spec = self.context.vectors.get(p.vector)
        positive = p.positive or (spec.positive if spec else [])
        negative = p.negative or (spec.negative if spec else [])
        if not positive or len(positive) != len(negative):
            raise ValueError(
                f"policy '{self.name}' needs matching concept prompts: give params.positive and "
                f"params.negative, or pairs on steering vector '{p.vector}'"
            )
        self.layer = p.concept_layer if p.concept_layer is not None else small.num_layers // 2
        if not 0 <= self.layer < small.num_layers:
            raise ValueError(
                f"policy '{self.name}': concept_layer {self.layer} outside the small model's "
                f"blocks 0..{small.num_layers - 1}"
            )
        hidden = small.base_hidden_states(positive + negative, pool=p.pool)[:, self.layer]
        pos, neg = hidden[: len(positive)].mean(0), hidden[len(positive) :].mean(0)
        self.direction = pos - neg
        self.midpoint = (pos + neg) / 2

    def score(self, state: RequestState) -> float:
        """The concept score of the request's running text."""
        p = state.params
        out = state.output(BASE)
        # per position, the state of this block: kept across calls, as each forward reads
        # only the new tokens (and re-reads what a backtrack rewrote)
        seen: dict[int, torch.Tensor] = state.scratch.setdefault("hidden", {})
        new = out.hidden[self.layer]
        first = out.length - new.shape[0]
        keep_from = out.length - (p.window if p.pool == "mean" else 1)
        for pos in [q for q in seen if q >= first or q < keep_from]:
            del seen[pos]
        for i in range(max(first, keep_from), out.length):
            seen[i] = new[i - first]
        h = torch.stack([seen[q] for q in sorted(seen)]).mean(0).to(self.direction.device)
        return concept_score(h, self.direction, self.midpoint)

    def on_event(self, state: RequestState, event: Event) -> list[Action]:
        if state.scratch.get("scored_at") == len(state.tokens):
            return []  # one decision per call, whatever the number of events
        state.scratch["scored_at"] = len(state.tokens)
        p = state.params
        score = self.score(state)
        state.scratch["score"] = score
        active = state.scratch.get("active", False)
        if not active and score > p.threshold:
            state.scratch["active"] = True
            actions: list[Action] = [SteerVector(name=p.vector, coeff=p.coeff, layers=p.layers)]
            n = min(p.backtrack, state.max_backtrack, state.next_step)
            if n and not state.scratch.get("backtracked") and not isinstance(event, Prefilled):
                state.scratch["backtracked"] = True
                actions.append(Backtrack(n=n))
            return actions
        if active and p.release_below is not None and score < p.release_below:
            state.scratch["active"] = False
            return [ClearSteer(name=p.vector)]
        return []


def concept_score(hidden: torch.Tensor, direction: torch.Tensor, midpoint: torch.Tensor) -> float:
    """The score VectorGuard uses, for one hidden state [hidden]."""
    half = float(direction.dot(direction)) / 2 or 1.0
    return float((hidden - midpoint).dot(direction)) / half
