"""The Ingress's gate (deployments/guard.py): which key opens which route, which limit applies.
Plain functions, no Ray; tests/serve/test_robustness.py checks the same through the app."""

from __future__ import annotations

import pytest

from deployments.guard import GuardSettings


@pytest.mark.parametrize("method, path, key, status", [
    ("GET", "/healthz", None, None),
    ("HEAD", "/healthz", None, None),
    ("POST", "/v1/chat/completions", None, 401),
    ("POST", "/v1/chat/completions", "wrong", 401),
    ("POST", "/v1/chat/completions", "use", None),
    ("POST", "/v1/chat/completions", "admin", None),
    ("GET", "/openapi.json", None, 401),
    ("GET", "/docs", "use", None),
    ("POST", "/v1/files", "use", None),
    ("DELETE", "/v1/files/file-1", "use", 403),
    ("DELETE", "/v1/vector_stores/vs_1/files/file-1", "use", 403),
    ("DELETE", "/v1/vector_stores/vs_1", "admin", None),
    ("POST", "/v1/load_lora_adapter", "use", 403),
    ("POST", "/v1/unload_lora_adapter", "admin", None),
    ("POST", "/v1/steering/vectors", "use", 403),
    ("POST", "/v1/steering/vectors/extract", "use", 403),
    ("GET", "/v1/steering/vectors", "use", None),
    ("DELETE", "/v1/steering/vectors/calm", "use", 403),
    ("DELETE", "/v1/steering/vectors/calm", "admin", None),
])
def test_key_tiers(method, path, key, status):
    settings = GuardSettings(api_keys=["use"], admin_api_keys=["admin"])
    error = settings.refusal(method, path, f"Bearer {key}" if key else "")
    assert (error.status_code if error else None) == status


def test_one_tier_and_no_keys():
    one = GuardSettings(api_keys=["k"])
    assert one.refusal("POST", "/v1/load_lora_adapter", "Bearer k") is None
    assert one.refusal("POST", "/v1/load_lora_adapter", "").status_code == 401
    assert GuardSettings().refusal("POST", "/v1/load_lora_adapter", "") is None
    admin_only = GuardSettings(admin_api_keys=["a"])  # use routes open, admin routes keyed
    assert admin_only.refusal("POST", "/v1/chat/completions", "") is None
    assert admin_only.refusal("POST", "/v1/load_lora_adapter", "").status_code == 401


def test_limits_per_route():
    settings = GuardSettings(max_request_bytes=1000, upload_limits={"/v1/files": 5000})
    assert settings.limit("POST", "/v1/files") == 5000
    assert settings.limit("POST", "/v1/chat/completions") == 1000
    assert settings.limit("GET", "/v1/files") == 1000


def test_a_chunked_upload_is_cut_off_past_its_limit():
    """No Content-Length: the guard counts the multipart body as the form parser reads it and
    stops it at the limit (413), before the route or the Retriever see a byte of the file."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from deployments.files_api import build_files_router
    from deployments.guard import RequestGuard
    from deployments.http import install_error_handlers

    called = []
    app = FastAPI()
    install_error_handlers(app)
    app.add_middleware(RequestGuard)
    app.state.guard = GuardSettings(max_request_bytes=4096, upload_limits={"/v1/files": 8192})
    app.include_router(build_files_router(lambda: called.append(1)))
    body = (b"--b\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nassistants\r\n"
            b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.txt\"\r\n\r\n"
            + b"x" * 100_000 + b"\r\n--b--\r\n")

    def chunks():
        for i in range(0, len(body), 4096):
            yield body[i:i + 4096]

    with TestClient(app) as client:
        r = client.post("/v1/files", content=chunks(),
                        headers={"Content-Type": "multipart/form-data; boundary=b"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert called == []
