"""Request and response types of Tandem's admin routes: LoRA adapters (vLLM's routes) and
steering vectors. Parsed with `protocol.parse_request`, so problems are 400s naming the field.

The bodies are strict (no "3" for 3): they were hand-checked with isinstance before.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationInfo,
    field_validator,
)

NonEmpty = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]
RESERVED_ADAPTER_NAMES = ("auto", "base")


class UnloadLoraAdapterRequest(BaseModel):
    """Body of POST /v1/unload_lora_adapter."""

    model_config = ConfigDict(strict=True)

    lora_name: NonEmpty


class LoadLoraAdapterRequest(UnloadLoraAdapterRequest):
    """Body of POST /v1/load_lora_adapter; the path must lie under router.adapter_roots.
    With `examples` (prompts of the adapter's task) the Router learns it, so `auto` can pick
    it; `description` shows in the Router's info."""

    lora_path: NonEmpty
    description: Annotated[str, StringConstraints(max_length=1000)] = ""
    examples: Annotated[list[Annotated[str, StringConstraints(min_length=1, max_length=4000)]],
                        Field(max_length=200)] = []  # fmt: skip

    @field_validator("lora_name")
    @classmethod
    def _check_name(cls, v: str) -> str:
        if ":" in v or v in RESERVED_ADAPTER_NAMES:
            raise ValueError(f"'{v}' cannot name an adapter (reserved, or contains ':')")
        return v

    def checked_path(self, roots: list[str], max_rank: int | None) -> str:
        """`lora_path` resolved under one of `roots` and checked to hold a loadable adapter."""
        from models.routing.adapter_paths import inspect_adapter_dir, resolve_adapter_path

        path = str(resolve_adapter_path(self.lora_path, roots))
        inspect_adapter_dir(path, max_rank=max_rank)
        return path


class ExtractVectorRequest(BaseModel):
    """Body of POST /v1/steering/vectors/extract: contrastive pairs, mean difference or PCA."""

    model_config = ConfigDict(strict=True)

    name: NonEmpty
    positive: list[Annotated[str, StringConstraints(min_length=1)]]
    negative: list[Annotated[str, StringConstraints(min_length=1)]]
    layers: list[int] | None = None
    method: Literal["mean", "pca"] = "mean"

    @field_validator("negative")
    @classmethod
    def _pairs(cls, v: list[str], info: ValidationInfo) -> list[str]:
        positive = info.data.get("positive")
        if not v or positive is None or len(positive) != len(v):
            raise ValueError("'positive' and 'negative' must be equally long, non-empty lists "
                             "of non-empty strings (contrastive pairs)")
        return v


class SteeringVectorObject(BaseModel):
    """A steering vector a Generator replica can apply."""

    id: str
    object: Literal["steering.vector"] = "steering.vector"
    name: str
    layers: list[int]
    hidden_size: int
    model_hint: str
    metadata: dict[str, Any]


class SteeringVectorList(BaseModel):
    object: Literal["list"] = "list"
    data: list[SteeringVectorObject]
