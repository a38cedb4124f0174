"""POST /v1/features/extract: the top-k SAE features per token of texts, as a FastAPI router the
Ingress includes. The logic (and the request model) lives in models/openai/features.py; the
big model's forward runs in the Ingress replica, in a thread."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from deployments.http import OpenAIErrorRoute, body_schema, read_request
from models.openai.features import FeatureExtractRequest, extract_features


def build_features_router(reader: Any, limit: int) -> APIRouter:
    """`reader`: the serving layer's ActivationReader (None: no SAE; the route answers 404)."""
    router = APIRouter(route_class=OpenAIErrorRoute)

    @router.post("/v1/features/extract", openapi_extra=body_schema(FeatureExtractRequest))
    async def extract(request: Request):
        body = await read_request(request, FeatureExtractRequest, limit)
        return await extract_features(reader, body)

    return router
