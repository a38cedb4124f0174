"""What goes into an engine: one sequence to generate and how to sample it.

Every engine speaks these types; the OpenAI layer builds them once (models.openai.protocol
converts its request models into them). Plain dataclasses, so they pickle across Ray.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from models.protocol.constraints import OutputConstraint
from models.protocol.steering import SteeringRequest


@dataclass
class SamplingParams:
    """How to pick tokens for one sequence.

    temperature 0 means greedy. top_k 0 means off. `logprobs` is None for no logprobs, or the
    number of top alternatives to return with each sampled token's own logprob (0 = only it).
    `seed` makes a sequence reproducible on its own, whatever else shares the batch.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None
    logit_bias: dict[int, float] = field(default_factory=dict)
    presence_penalty: float = 0.0  # minus this for every token already in the output
    frequency_penalty: float = 0.0  # minus this times the token's count in the output
    repetition_penalty: float = 1.0  # prompt and output tokens: logit / p if > 0 else logit * p
    min_tokens: int = 0  # end-of-sequence and stop tokens are barred before this many tokens

    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty
                    or self.repetition_penalty != 1.0 or self.min_tokens)  # fmt: skip


@dataclass
class SteerVectorSpec:
    """A steering vector to add to the big model's hidden states: h_l += coeff * v_l."""

    name: str
    coeff: float
    layers: list[int] | None = None  # None: every layer the vector has


@dataclass
class GenerationRequest:
    """One sequence to generate. n > 1 in the API becomes n requests with derived ids and seeds."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    adapter: str | None = None  # LoRA adapter name; None = base model
    adapter_weights: dict[str, float] | None = None  # top-k router mix: name -> weight
    steer_vectors: list[SteerVectorSpec] = field(default_factory=list)  # static, whole request
    steering: SteeringRequest | None = None  # a policy consulted token by token
    trace_id: str | None = None  # the API request id when a per-token trace is kept
    constraint: OutputConstraint | None = None  # the output must match this grammar
    speculative_k: int | None = None  # drafted tokens per step; None = the engine's, 0 = off
    # big-model layers whose residual stream (after block l) each step captures for this row
    hidden_layers: list[int] = field(default_factory=list)
