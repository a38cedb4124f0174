"""Ray metrics of the deployments (Ray's Prometheus endpoint and dashboard)."""

from __future__ import annotations

import asyncio

from models.protocol.engine import Engine

ENGINE_GAUGES = {
    "num_running": "Sequences in the running batch.",
    "num_waiting": "Requests waiting for KV-cache space or a batch slot.",
    "free_blocks": "Free KV-cache blocks.",
    "generated_tokens": "Tokens generated since start.",
    "steps": "Engine steps since start.",
    "observer_calls": "Steerer calls since start (one per steered step).",
    "prefix_cache_hit_rate": "Share of admitted prompt tokens found in the prefix cache.",
}


async def export_engine_stats(engine: Engine, period_s: float = 1.0) -> None:
    """The engine's counters as `tandem_engine_*` gauges, once a period, forever."""
    from ray.serve import metrics

    gauges = {n: metrics.Gauge(f"tandem_engine_{n}", description=d)
              for n, d in ENGINE_GAUGES.items()}  # fmt: skip
    while True:
        stats = engine.stats()
        for name, gauge in gauges.items():
            gauge.set(float(getattr(stats, name)))
        await asyncio.sleep(period_s)
