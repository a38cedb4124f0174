"""One Ray and one Ray Serve (HTTP on a free port) for every Serve test module: each module
deploys its own application under its own name and route prefix and deletes it after."""

from __future__ import annotations

import pytest

from tests.conftest import free_port


@pytest.fixture(scope="session")
def serve_url():
    """The Serve HTTP address; apps are deployed under it by the modules."""
    import ray
    from ray import serve

    # metrics reach Ray's Prometheus endpoint within a second (default: every 10 s)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             _system_config={"metrics_report_interval_ms": 1000})
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


def deploy(app, name: str, route_prefix: str | None):
    """serve.run under `name`; returns the ingress handle."""
    from ray import serve

    return serve.run(app, name=name, route_prefix=route_prefix)
