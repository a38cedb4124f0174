"""`build_app`: the import_path target of serve_config.yaml.

Validates `args:` against the one config schema (models/config.py) and binds the deployments,
each with its own Ray options from `deployments:` in the config. Those a config does not need
are left out: no adapters, no Router; `retrieval.enabled: false`, no Retriever; no steering
policies, no Steerer.
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from models.config import load_config


def build_app(args: dict[str, Any] | None = None) -> Application:
    """The Tandem application: Ingress over Generator, and Router, Retriever and Steerer
    where the config needs them (a deployment left out is not even imported: no FAISS or
    embedder for an app without retrieval)."""
    from deployments.generator import Generator
    from deployments.ingress import Ingress

    config = load_config(args)
    raw = config.model_dump(mode="json")
    d = config.deployments
    steerer = None
    if config.steering.policies:
        from deployments.steerer import Steerer

        steerer = Steerer.options(**d.steerer.ray_options()).bind(raw)
    generator = Generator.options(**d.generator.ray_options()).bind(raw, steerer)
    router = None
    if config.adapters:
        from deployments.router import Router

        adapters = [a.model_dump() for a in config.adapters]
        router = Router.options(**d.router.ray_options()).bind(
            adapters, config.router.model_dump(), config.server.state_dir)
    retriever = None
    if config.retrieval.enabled:
        from deployments.retriever import Retriever

        retrieval = config.retrieval.model_dump()
        retriever = Retriever.options(**d.retriever.ray_options()).bind(retrieval)
    return Ingress.options(**d.ingress.ray_options()).bind(raw, generator, router, retriever)
