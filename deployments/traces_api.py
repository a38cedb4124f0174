"""GET /v1/traces/{request_id}: a request's per-token trace, as a FastAPI router the Ingress
includes. Traces live in the Generator replica that served the request (models/tracing.py);
every replica is asked (`broadcast`) and the one that has it answers."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from deployments.http import OpenAIErrorRoute
from models.openai.errors import OpenAIError


def build_traces_router(generator: Any) -> APIRouter:
    router = APIRouter(route_class=OpenAIErrorRoute)

    @router.get("/v1/traces/{request_id}")
    async def get_trace(request_id: str):
        """Kept for telemetry.trace_ttl_s after the request finished; 404 before or after."""
        for trace in await generator.broadcast("trace", request_id).results_async():
            if trace is not None:
                return trace
        raise OpenAIError(f"no trace for request '{request_id}': it did not ask for one "
                          "(tandem: {trace: true}), is still unknown, or expired", 404,
                          param="request_id", code="trace_not_found")  # fmt: skip

    return router
