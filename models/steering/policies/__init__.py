"""Steering policies: the built-in ones by name, user classes by import path (config only)."""

from __future__ import annotations

from models.plugins import import_subclass, is_import_path
from models.steering.policies.base import Policy, PolicyContext, TokenizerMismatchError
from models.steering.policies.contrastive import Contrastive
from models.steering.policies.probe import Probe
from models.steering.policies.proxy_tuning import ProxyTuning
from models.steering.policies.vector_guard import VectorGuard

BUILTIN_POLICIES: dict[str, type[Policy]] = {
    "vector_guard": VectorGuard,
    "proxy_tuning": ProxyTuning,
    "contrastive": Contrastive,
    "probe": Probe,
}


def policy_needs(policies: list) -> dict[str, tuple[str, ...]]:
    """The engine capabilities each configured policy (a PolicyConfig) needs, by name."""
    return {spec.name: policy_class(spec.kind).needs for spec in policies}


def policy_class(kind: str) -> type[Policy]:
    """A built-in policy by name, or a Policy subclass named `module:Class`."""
    if kind in BUILTIN_POLICIES:
        return BUILTIN_POLICIES[kind]
    if not is_import_path(kind):
        raise ValueError(
            f"unknown policy kind '{kind}'; built-in: {', '.join(BUILTIN_POLICIES)}, "
            "or an import path module:Class"
        )
    return import_subclass(kind, Policy, "policy")


__all__ = [
    "BUILTIN_POLICIES",
    "Contrastive",
    "Policy",
    "PolicyContext",
    "Probe",
    "ProxyTuning",
    "TokenizerMismatchError",
    "VectorGuard",
    "policy_class",
    "policy_needs",
]
