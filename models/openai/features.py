"""`POST /v1/features/extract`: the top-k SAE features (steering.sae) of every token of texts.

Request `{"input": str | [str], "top_k": 5}`; response `{"object": "list", "layer", "data":
[{"index", "text", "tokens": [{"token", "token_id", "features": [{"index", "name",
"activation"}]}]}]}`, features strongest first (only those that fire; `name` is null for a
feature no script named). The forward runs where the route is served (a transformers forward
of the big model, in a thread)."""

from __future__ import annotations

import asyncio
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from models.activations.reader import ActivationReader, ActivationRequestError
from models.openai.errors import OpenAIError


class FeatureExtractRequest(BaseModel):
    """A text or texts whose tokens' SAE features to return."""

    model_config = ConfigDict(extra="forbid")

    input: str | list[str] = Field(description="A text, or up to 16 texts.")
    top_k: int = Field(5, ge=1, le=32, description="Features per token, strongest first.")
    model: str | None = Field(None, description="Ignored: the served base model is read.")

    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


async def extract_features(reader: ActivationReader | None, body: FeatureExtractRequest) -> dict[str, Any]:
    """The route's answer; 404 without an SAE, 400 for texts past the limits."""
    if reader is None or reader.sae is None:
        raise OpenAIError("no SAE is configured (steering.sae): features cannot be extracted",
                          404, code="sae_not_configured")  # fmt: skip
    try:
        data = await asyncio.to_thread(reader.extract, body.texts(), body.top_k)
    except ActivationRequestError as exc:
        raise OpenAIError(str(exc), 400, param=exc.param, code=exc.code) from None
    return {"object": "list", "layer": reader.sae.layer, "n_features": reader.sae.n_features,
            "data": data}  # fmt: skip
