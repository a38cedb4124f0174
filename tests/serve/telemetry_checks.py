"""What an operator sees, through the real app (built-in toy model, real Router, Retriever and
Steerer): Ray's Prometheus endpoint holds every Tandem metric family with counts after a
streamed, a steered, a routed and a RAG request; every query of the Grafana dashboard names a
scraped metric; request ids come back in the header, the body and the JSON logs; a traced
steered request's trace lists the response's interventions step by step.

The checks run in test_app.py on its app (one deployment of the real app for both: each costs
about a minute on 2 cores), which imports them and builds its args with `telemetry_args`;
they need its `base_url` and `client` fixtures and run first, before it redeploys the app."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import httpx
import openai
import pytest

from deployments.telemetry import families

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "monitoring" / "grafana" / "tandem.json"
GLOOMY = "Continue the story: Omar feels gloomy. The park is awful."
# families that appear only once their event happened (none of the requests here makes one)
IDLE_GAUGES = {"ray_tandem_engine_running", "ray_tandem_engine_waiting",
               "ray_tandem_engine_kv_blocks_used"}  # 0 whenever no request runs
RARE = {"ray_tandem_steering_timeouts_total", "ray_tandem_engine_preemptions_total",
        "ray_tandem_engine_failures_total"}  # fmt: skip


@pytest.fixture(scope="module")
def trace_dir(tmp_path_factory):
    """Where the app appends finished traces (telemetry.trace_dir in its args)."""
    return tmp_path_factory.mktemp("traces")


def telemetry_args(args: dict, trace_dir: Path) -> dict:
    """The app's args with what these checks need: a policy that always fails (the Steerer
    failure family) and a trace directory."""
    args.setdefault("steering", {}).setdefault("policies", []).append(
        {"name": "broken", "kind": "tests.fakes.policies:FailingPolicy"})
    args["telemetry"] = {"trace_dir": str(trace_dir)}
    return args


def chat(client, content: str, **kw):
    return client.chat.completions.create(
        model=kw.pop("model", "tandem"), messages=[{"role": "user", "content": content}],
        temperature=0, **kw)  # fmt: skip


def scrape() -> dict[str, float]:
    """Ray's Prometheus endpoint: each Tandem family -> the sum of its samples (histograms:
    of their counts)."""
    import ray
    from prometheus_client.parser import text_string_to_metric_families

    port = ray.nodes()[0]["MetricsExportPort"]
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    found: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        if not fam.name.startswith("ray_tandem_"):
            continue
        name = fam.name + ("_total" if fam.type == "counter" else "")
        samples = [s for s in fam.samples if fam.type != "histogram" or s.name.endswith("_count")]
        found[name] = sum(s.value for s in samples)
    return found


@pytest.fixture(scope="module")
def traffic(client, base_url, tmp_path_factory):
    """A streamed, a steered, a routed, a RAG request, a failing policy, an upload, an error."""
    stream = chat(client, "Where is Mia?", max_tokens=32, stream=True,
                  extra_body={"ignore_eos": True})  # several chunks: inter-token times
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    steered = chat(client, GLOOMY, max_tokens=8,
                   extra_body={"steering": {"policy": "guard", "mode": "sync"}})
    assert steered.model_extra["tandem"]["interventions"]
    late = chat(client, GLOOMY, max_tokens=8,  # async logit adjustments arrive late
                extra_body={"steering": {"policy": "proxy", "mode": "async"}})
    assert late.usage.completion_tokens
    broken = chat(client, GLOOMY, max_tokens=4, extra_body={"steering": {"policy": "broken"}})
    assert broken.model_extra["tandem"]["interventions"][0]["action"] == "steerer_error"
    routed = chat(client, "Rewrite in a positive tone: the old dog is sad near the lake.",
                  model="tandem:auto", max_tokens=4)
    assert routed.model_extra["tandem"]["adapter"] == "rewrite"
    notes = tmp_path_factory.mktemp("notes") / "notes.md"
    notes.write_text("# Boats\n\nNina paints the boats by the lake every morning.\n")
    f = client.files.create(file=notes.open("rb"), purpose="assistants")
    store = client.vector_stores.create(name="notes", file_ids=[f.id])
    rag = chat(client, "Who paints the boats?", max_tokens=8,
               extra_body={"rag": {"vector_store_ids": [store.id, "world"]}})
    assert rag.model_extra["tandem"]["sources"]
    with pytest.raises(openai.NotFoundError):
        chat(client, "Hi", model="no-such-model", max_tokens=2)
    wanted = set(families()) - RARE - IDLE_GAUGES
    deadline, found = time.monotonic() + 30, {}
    while time.monotonic() < deadline:
        found = scrape()
        if all(found.get(name, 0) > 0 for name in wanted):
            break
        time.sleep(1)
    return found


def test_every_family_is_scraped_with_counts(traffic):
    missing = [n for n in set(families()) - RARE - IDLE_GAUGES if traffic.get(n, 0) <= 0]
    assert not missing, f"families without counts: {missing}"
    assert IDLE_GAUGES <= set(traffic)
    assert traffic["ray_tandem_steering_interventions_total"] >= 1
    assert traffic["ray_tandem_generation_tokens_total"] >= 8


def test_grafana_queries_name_scraped_metrics(traffic):
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 15
    known, shown = set(traffic) | RARE, set()
    for expr in exprs:
        names = set(re.findall(r"\b(ray_tandem_[a-z0-9_]+?)(?:_bucket|_count|_sum)?\b", expr))
        assert names, expr
        assert names <= known, f"{expr} names {names - known}, not scraped"
        shown |= names
    assert shown == set(families())  # and every family has a panel


def test_request_id_in_header_and_body(base_url):
    body = {"model": "tandem", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    r = httpx.post(f"{base_url}/v1/chat/completions", json=body,
                   headers={"x-request-id": "ops-42"}, timeout=60)  # fmt: skip
    assert r.status_code == 200
    assert r.headers["x-request-id"] == "ops-42" == r.json()["tandem"]["request_id"]
    r = httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=60)
    assert r.headers["x-request-id"] == r.json()["tandem"]["request_id"] != "ops-42"


def test_replica_logs_are_json_lines_with_the_request_id(base_url):
    import ray

    body = {"model": "tandem", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    httpx.post(f"{base_url}/v1/chat/completions", json=body, headers={"x-request-id": "log-7"},
               timeout=60)  # fmt: skip
    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs" / "serve"
    deadline, found = time.monotonic() + 20, []
    while not found and time.monotonic() < deadline:
        for path in logs.glob("replica_tandem_Ingress_*.log"):
            for line in path.read_text().splitlines():
                if "log-7" in line:
                    found.append(json.loads(line))
        time.sleep(0.5)
    assert found and all(entry["request_id"] == "log-7" for entry in found)


def test_trace_lists_the_interventions_step_by_step(base_url, client, trace_dir):
    r = chat(client, GLOOMY, max_tokens=10, extra_headers={"x-request-id": "trace-1"},
             extra_body={"steering": {"policy": "guard", "mode": "sync"}, "tandem": {"trace": True}})
    tandem = r.model_extra["tandem"]
    assert tandem["request_id"] == "trace-1" and tandem["interventions"]
    trace = httpx.get(f"{base_url}/v1/traces/trace-1", timeout=30).json()
    (choice,) = trace["choices"]
    assert choice["policy"] == "guard" and choice["finished"]
    said = [(i["step"], i["action"]) for i in tandem["interventions"]]
    assert [(i["step"], i["action"]) for i in choice["interventions"]] == said
    steps = {s["step"]: s for s in choice["steps"]}
    assert len([s for s in steps.values() if "token_id" in s]) == r.usage.completion_tokens
    for step, action in said:
        assert action in [i["action"] for i in steps[step]["interventions"]]
        calls = steps[step]["calls"]  # the call whose answer made it, with its latency
        assert any(a["type"] == action for c in calls for a in c["actions"])
        assert all(c["policy"] == "guard" and c["latency_ms"] > 0 for c in calls)
    lines = (trace_dir / "traces.jsonl").read_text().splitlines()
    assert any(json.loads(line)["request_id"] == "trace-1" for line in lines)
    assert httpx.get(f"{base_url}/v1/traces/nope", timeout=30).status_code == 404
    untraced = chat(client, "Hi", max_tokens=2)
    untraced_id = untraced.model_extra["tandem"]["request_id"]
    assert httpx.get(f"{base_url}/v1/traces/{untraced_id}", timeout=30).status_code == 404
