"""One Ray and one Ray Serve (HTTP on a free port) for every Serve test module: each module
deploys its own application under its own name and route prefix and deletes it after."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

from tests.conftest import free_port


# The Ray processes run the way `make serve` runs them (monitoring/serve.sh): Ray Serve's
# throughput mode with HAProxy in front. Set only for the cluster this fixture starts, after
# this process imported Ray Serve: the test process's own handles keep their router on a loop
# of their own, so tests may call them synchronously (a replica's handles may not). HAProxy's
# files and side ports are this session's own, so test runs beside each other don't meet.
def serve_mode_env(folder: str) -> dict[str, str]:
    return {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1",
            "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1",
            # a deleted app's Ingress stays reachable this long (default 30 s: every delete)
            "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1",
            "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": f"{folder}/haproxy.cfg",
            "RAY_SERVE_HAPROXY_SOCKET_PATH": f"{folder}/admin.sock",
            "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": f"{folder}/metrics.sock",
            "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": folder,
            "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": f"{folder}/server-state",
            **{f"RAY_SERVE_{name}": str(free_port()) for name in (
                "FALLBACK_PROXY_HTTP_PORT", "FALLBACK_PROXY_GRPC_PORT",
                "HAPROXY_METRICS_PORT", "HAPROXY_STATS_PORT")}}  # fmt: skip


@pytest.fixture(scope="session")
def serve_url():
    """The Serve HTTP address; apps are deployed under it by the modules."""
    import ray
    from ray import serve

    folder = tempfile.mkdtemp(prefix="hap")  # short: HAProxy's socket paths end ≤ 97 bytes
    mode = serve_mode_env(folder)
    before = {name: os.environ.get(name) for name in mode}
    os.environ.update(mode)  # Ray's processes inherit them at ray.init
    # metrics reach Ray's Prometheus endpoint within a second (default: every 10 s)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             _system_config={"metrics_report_interval_ms": 1000})
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()
    shutil.rmtree(folder, ignore_errors=True)
    for name, value in before.items():  # later subprocesses don't inherit a gone cluster's
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def deploy(app, name: str, route_prefix: str | None):
    """serve.run under `name`; returns the ingress handle."""
    from ray import serve

    return serve.run(app, name=name, route_prefix=route_prefix)
