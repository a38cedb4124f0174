"""FailingPolicy: a steering policy that always raises, a stand-in for a broken user policy.

Plumbing only: the telemetry tests use it to make the Steerer fail on purpose (the row goes on
unsteered, the response reports `steerer_error`, tandem_steering_failures_total counts it).
"""

from __future__ import annotations

from models.protocol.steering import Action, Event
from models.steering.policies.base import Policy
from models.steering.state import RequestState


class FailingPolicy(Policy):
    """Raises on every event."""

    def on_event(self, state: RequestState, event: Event) -> list[Action]:
        raise RuntimeError("this policy always fails (tests.fakes.policies)")
