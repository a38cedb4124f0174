"""Engine capabilities: what a request needs, and the 400 that names the engine and the
capability it lacks (checked at admission, never a silent no-op)."""

from __future__ import annotations

import pytest

from models.engine.torch_engine import TorchEngine
from models.protocol.constraints import OutputConstraint
from models.protocol.engine import (
    EngineCapabilities,
    UnsupportedByEngineError,
    check_capabilities,
    request_needs,
)
from models.protocol.requests import GenerationRequest, SteerVectorSpec
from models.protocol.steering import SteeringRequest
from models.steering.config import SteeringConfig
from models.steering.policies import policy_needs

POLICIES = SteeringConfig.model_validate({"policies": [
    {"name": "proxy", "kind": "proxy_tuning"},
    {"name": "contrast", "kind": "contrastive"},
    {"name": "guard", "kind": "vector_guard", "params": {"vector": "v"}},
    {"name": "mine", "kind": "tests.steering.test_runtime:Exploding"},
]}).policies  # fmt: skip


class LogitsOnly:
    """Stands in for an engine's identity only (name and capabilities): what the check reads."""

    name = "logits-only"
    capabilities = EngineCapabilities(logit_steering=True, per_row_lora=True)


def req(**kw) -> GenerationRequest:
    return GenerationRequest("r", [1, 2, 3], **kw)


def test_policies_say_what_they_need():
    assert policy_needs(POLICIES) == {
        "proxy": ("logit_steering",),
        "contrast": ("logit_steering",),
        "guard": ("token_events", "hidden_state_steering"),
        "mine": ("token_events",),  # a user policy may answer with any action
    }


def test_a_request_needs_what_its_fields_ask_for():
    needs = policy_needs(POLICIES)
    assert request_needs(req()) == {}
    assert request_needs(req(steer_vectors=[SteerVectorSpec("v", 1.0)])) == {
        "hidden_state_steering": "steer_vectors"}
    assert request_needs(req(adapter_weights={"a": 0.5, "b": 0.5})) == {"adapter_mix": "adapter"}
    assert request_needs(req(adapter_weights={"a": 1.0})) == {}
    assert request_needs(req(hidden_layers=[1, 3])) == {"hidden_state_capture": "tandem.activations"}
    steered = req(steering=SteeringRequest("proxy", params={"max_backtrack": 2}))
    assert request_needs(steered, needs) == {
        "logit_steering": "steering.policy", "backtrack": "steering.params.max_backtrack"}
    assert request_needs(req(steering=SteeringRequest("unknown")), needs) == {
        "token_events": "steering.policy"}
    grammar = OutputConstraint("lark", 'start: "x"')
    assert request_needs(req(constraint=grammar)) == {"structured_output": "response_format"}
    # the lazy tool-call grammar of tool_choice auto: served unconstrained where none can be
    assert request_needs(req(constraint=OutputConstraint("lark", 'start: "x"', optional=True))) == {}


def test_what_the_engine_lacks_is_a_400_naming_engine_and_capability():
    needs = policy_needs(POLICIES)
    check_capabilities(LogitsOnly(), req(steering=SteeringRequest("proxy")), needs)
    with pytest.raises(UnsupportedByEngineError) as e:
        check_capabilities(LogitsOnly(), req(steering=SteeringRequest("guard")), needs)
    assert e.value.status_code == 400 and e.value.code == "unsupported_by_engine"
    assert e.value.param == "steering.policy"
    assert "engine 'logits-only' cannot do token events (token_events)" in e.value.message
    assert "steering policy 'guard'" in e.value.message
    with pytest.raises(UnsupportedByEngineError, match="hidden_state_steering.*'steer_vectors'"):
        check_capabilities(LogitsOnly(), req(steer_vectors=[SteerVectorSpec("v", 1.0)]), needs)
    with pytest.raises(UnsupportedByEngineError, match="hidden_state_capture.*tandem.activations"):
        check_capabilities(LogitsOnly(), req(hidden_layers=[0]), needs)


def test_the_torch_engine_can_do_everything():
    caps = TorchEngine.capabilities
    assert caps == EngineCapabilities.all() and caps.missing(["token_events", "backtrack"]) == []
    assert TorchEngine.name == "torch"
