"""Steering policies: the built-in ones by name, user classes by import path (config only)."""

from __future__ import annotations

import importlib
from typing import Any

from models.steering.policies.base import Policy, PolicyContext, TokenizerMismatchError
from models.steering.policies.contrastive import Contrastive
from models.steering.policies.proxy_tuning import ProxyTuning
from models.steering.policies.vector_guard import VectorGuard

BUILTIN_POLICIES: dict[str, type[Policy]] = {
    "vector_guard": VectorGuard,
    "proxy_tuning": ProxyTuning,
    "contrastive": Contrastive,
}


def policy_class(kind: str) -> type[Policy]:
    """A built-in policy by name, or a Policy subclass named `module:Class`."""
    if kind in BUILTIN_POLICIES:
        return BUILTIN_POLICIES[kind]
    module_name, sep, class_name = kind.partition(":")
    if not sep or not module_name or not class_name:
        raise ValueError(
            f"unknown policy kind '{kind}'; built-in: {', '.join(BUILTIN_POLICIES)}, "
            "or an import path module:Class"
        )
    module = importlib.import_module(module_name)
    cls: Any = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, Policy)):
        raise TypeError(f"policy '{kind}' is not a subclass of models.steering.policies.Policy")
    return cls


__all__ = [
    "BUILTIN_POLICIES",
    "Contrastive",
    "Policy",
    "PolicyContext",
    "ProxyTuning",
    "TokenizerMismatchError",
    "VectorGuard",
    "policy_class",
]
