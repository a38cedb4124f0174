"""The API edge's view of the configured policies: a request's `steering.params` typed and
checked before admission exactly as the Steerer will read them, so a bad value is a 400 that
names the field instead of a row the Steerer silently leaves unsteered."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from models.steering.config import SteeringConfig
from models.steering.policies import Policy, policy_class
from models.steering.policies.base import PolicySetting

log = logging.getLogger(__name__)


@dataclass
class PolicyAdmission:
    """Each configured policy's class and config defaults (name -> (class, defaults)), and
    what params are checked against (the expert adapter, the big model's layers)."""

    policies: dict[str, tuple[type[Policy] | None, dict[str, Any]]]
    setting: PolicySetting

    @classmethod
    def from_config(cls, config: SteeringConfig, num_layers: int | None) -> PolicyAdmission:
        policies: dict[str, tuple[type[Policy] | None, dict[str, Any]]] = {}
        for spec in config.policies:
            try:
                kind: type[Policy] | None = policy_class(spec.kind)
            except Exception:  # noqa: BLE001 - the Steerer reports it at start; here: unchecked
                log.warning("policy '%s' (%s) cannot be imported here; its params are checked "
                            "by the Steerer only", spec.name, spec.kind, exc_info=True)  # fmt: skip
                kind = None
            policies[spec.name] = (kind, dict(spec.params))
        return cls(policies, PolicySetting(config.expert_adapter, num_layers))

    def check(self, policy: str, params: dict[str, Any]) -> list[str]:
        """Raise PolicyParamsError (its `param` names the field) unless `params` suit
        `policy`; returns the big-model steering vectors the request names beyond the
        config's, which the caller checks are registered."""
        kind, defaults = self.policies.get(policy, (None, {}))
        if kind is None:
            return []
        typed = kind.typed_params(policy, defaults, params)
        kind.check_params(policy, typed, defaults, self.setting)
        configured = kind.vectors_named(kind.typed_params(policy, defaults, {}))
        return [name for name in kind.vectors_named(typed) if name not in configured]
