"""Adapter and router settings (the `adapters:` and `router:` blocks of the config)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class AdapterConfig(BaseModel):
    """One LoRA adapter the Generator may load, and what the Router learns about it."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="Name used in requests as `<model>:<name>`.")
    path: str = Field(
        description="PEFT directory (adapter_config.json + weights), or builtin:<name>."
    )
    description: str = Field("", description="What the adapter is for (shown in /v1/models).")
    examples: list[str] = Field(
        default_factory=list, description="Example prompts the router trains on."
    )


class RouterConfig(BaseModel):
    """How `<model>:auto` picks adapters."""

    model_config = ConfigDict(extra="forbid")

    threshold: float = Field(
        0.5, ge=0, le=1, description="Below this confidence the router answers the base model."
    )
    top_k: int = Field(1, ge=1, le=4, description="Adapters mixed per request (weighted).")
    adapter_roots: list[str] = Field(
        default_factory=list,
        description="Directories under which /v1/load_lora_adapter may load adapters.",
    )
    base_class: bool = Field(
        True,
        description="Train a 'base' class on generic prompts (chit-chat, general questions) "
        "beside the adapters, so unrelated prompts go to the base model; off = threshold only.",
    )
    base_examples: list[str] = Field(
        default_factory=list,
        description="Extra generic prompts for the base class, added to the built-in set "
        "(models/routing/base_prompts.py): requests the base model should keep.",
    )
    regularization: float = Field(
        32.0,
        gt=0,
        description="Inverse L2 strength C of the logistic-regression head (larger = sharper "
        "probabilities; 32 measured best on tests/data/router_heldout.jsonl).",
    )
