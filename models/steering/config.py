"""Steering settings (the `steering:` block of the config)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class VectorConfig(BaseModel):
    """A steering vector for the big model: a file, or contrastive pairs to extract it from."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="Name used in requests.")
    path: str | None = Field(None, description="GGUF control vector or safetensors file.")
    positive: list[str] = Field(default_factory=list, description="Prompts showing the behaviour.")
    negative: list[str] = Field(default_factory=list, description="Matching prompts without it.")
    layers: list[int] | None = Field(None, description="Layers to extract at; None = middle half.")
    method: Literal["mean", "pca"] = Field("mean", description="mean of differences, or PCA.")
    pool: Literal["last", "mean"] = Field(
        "last",
        description="Hidden state of a prompt: at its last token (repeng's choice) or the mean "
        "over its tokens (steadier on small models trained on short texts).",
    )


class PolicyConfig(BaseModel):
    """A steering policy: built-in by name, or a user class by import path."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="Name used in requests.")
    kind: str = Field(
        description="vector_guard, proxy_tuning, contrastive, probe, or an import path "
        "module:Class."
    )
    params: dict[str, Any] = Field(default_factory=dict, description="Default parameters.")


class SteeringConfig(BaseModel):
    """The small model, the vectors and the policies."""

    model_config = ConfigDict(extra="forbid")

    small_model_source: str | None = Field(
        None, description="Small model checkpoint; None = the small model of a builtin source."
    )
    expert_adapter: str | None = Field(
        None, description="LoRA of the small model used as the proxy-tuning expert."
    )
    vectors: list[VectorConfig] = Field(default_factory=list, description="Steering vectors.")
    policies: list[PolicyConfig] = Field(default_factory=list, description="Steering policies.")
    default_mode: Literal["async", "sync", "colocated"] = Field(
        "async", description="Mode for requests that name none."
    )
    timeout_s: float = Field(
        2.0, gt=0, description="A Steerer call slower than this leaves the row unsteered."
    )
    breaker_failures: int = Field(
        3, ge=1, description="Remote Steerer calls failing or timing out in a row after which a "
        "Generator replica stops consulting it for breaker_cooldown_s (its rows go on "
        "unsteered at once, and their responses say so: tandem.unsteered_because).",
    )  # fmt: skip
    breaker_cooldown_s: float = Field(
        30.0, gt=0, description="How long an open breaker leaves the Steerer out; then one "
        "call tries it again (success closes the breaker, failure opens it again).",
    )  # fmt: skip
    vector_dir: str | None = Field(
        None,
        description="Directory of the steering-vector library (extracted vectors are cached "
        "there); None = $TANDEM_CACHE/vectors/<big model>.",
    )
    sae: str | None = Field(
        None, description="Sparse autoencoder of the big model's residual stream at one layer "
        "(models/steering/sae.py): a directory, or `builtin` for the one shipped with "
        "builtin:toy. Its features are steering vectors `sae:<name|index>` and are read per "
        "token by /v1/features/extract and tandem.activations.features. None = no SAE.",
    )  # fmt: skip
    max_live_requests: int = Field(
        4096, ge=1, description="Requests whose state (small-model KV) the Steerer keeps; the "
        "least recently seen beyond this are dropped and resync if they come back.",
    )  # fmt: skip
    small_model_runner: Literal["auto", "engine", "transformers"] = Field(
        "auto",
        description="Who runs the small model: the torch engine's paged runner (Llama family), "
        "transformers (any causal LM), or auto = the engine when it can load the checkpoint.",
    )
    read_ahead: bool = Field(
        False,
        description="After answering a step from the big model's logits, read the small model "
        "on the token greedy decoding will pick, in the background (a side CUDA stream), so "
        "the next step finds it ready; a wrong guess is re-read. Off by default: every read "
        "already overlaps the big model's forward on a side stream, and the guess costs a "
        "host sync per step (on the H200 proxy tuning's step goes 1.26x -> 1.37x the unsteered "
        "one at batch 1, 1.42x -> 1.63x at batch 16; bench/steering.py gpu).",
    )
    kv_cache_gib: float = Field(
        1.0, gt=0, description="Size of the small model's paged KV cache (engine runner)."
    )
    max_model_len: int | None = Field(
        None,
        ge=1,
        description="Longest sequence the small model reads (engine runner: its block tables "
        "and decode attention are sized for it). None = the big model's context "
        "(engine.max_model_len), else the small checkpoint's own, at most 16384.",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Where the small model runs; auto picks CUDA when a GPU is visible."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Small-model dtype; auto = float32 on CPU, bfloat16 on CUDA."
    )


class SteeringSetup(BaseModel):
    """What builds a colocated steering runtime anywhere (SteeringRuntime.from_setup): the
    `steering:` block, the big model's `model.source` and its context. Plain data, so it
    travels to another process (the vLLM engine's core) as JSON."""

    steering: SteeringConfig
    model_source: str
    max_model_len: int | None = None
