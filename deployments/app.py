"""`build_app`: the import_path target of serve_config.yaml.

Validates `args:` against the one config schema (models/config.py) and binds the five
deployments, each with its own Ray options from `deployments:` in the config.
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from models.config import load_config


def build_app(args: dict[str, Any] | None = None) -> Application:
    """The Tandem application: Ingress over Router, Retriever, Generator and Steerer."""
    from deployments.generator import Generator
    from deployments.ingress import Ingress
    from deployments.retriever import Retriever
    from deployments.router import Router
    from deployments.steerer import Steerer

    config = load_config(args)
    raw = config.model_dump(mode="json")
    d = config.deployments
    steerer = Steerer.options(**d.steerer.ray_options()).bind(raw)
    generator = Generator.options(**d.generator.ray_options()).bind(raw, steerer)
    router = Router.options(**d.router.ray_options()).bind(
        [a.model_dump() for a in config.adapters], config.router.model_dump()
    )
    retriever = Retriever.options(**d.retriever.ray_options()).bind(config.retrieval.model_dump())
    return Ingress.options(**d.ingress.ray_options()).bind(raw, generator, router, retriever)
