"""A request's `steering.params` typed per policy at the API edge (PolicyAdmission), the way
the Steerer reads them: unknown keys, wrong types and values out of range are refused with the
field named; good params pass and come out as the Steerer will use them."""

from __future__ import annotations

import pytest

from models.steering.config import SteeringConfig
from models.steering.policies.admission import PolicyAdmission
from models.steering.policies.base import PolicyParamsError

CONFIG = SteeringConfig.model_validate({
    "expert_adapter": "positive",
    "policies": [
        {"name": "guard", "kind": "vector_guard",
         "params": {"vector": "positive", "coeff": 1.0, "threshold": 0.5, "concept_layer": 0,
                    "positive": ["a"], "negative": ["b"]}},
        {"name": "proxy", "kind": "proxy_tuning", "params": {"alpha": 1.0, "expert": "positive"}},
        {"name": "contrastive", "kind": "contrastive", "params": {"beta": 0.5}},
        {"name": "own", "kind": "tests.steering.test_runtime:Exploding"},
    ],
})  # fmt: skip


@pytest.fixture(scope="module")
def admission():
    return PolicyAdmission.from_config(CONFIG, num_layers=4)


BAD = [
    ("guard", {"threshold": "x"}, "steering.params.threshold", "valid number"),
    ("guard", {"window": 0}, "steering.params.window", "greater than or equal to 1"),
    ("guard", {"nope": 1}, "steering.params.nope", "has no parameter 'nope'"),
    ("guard", {"coeff": 1e30}, "steering.params.coeff", "less than or equal to 100"),
    ("guard", {"coeff": float("nan")}, "steering.params.coeff", "finite"),
    ("guard", {"threshold": float("inf")}, "steering.params.threshold", "finite"),
    ("guard", {"backtrack": -1}, "steering.params.backtrack", "greater than or equal to 0"),
    ("guard", {"layers": [1, 9]}, "steering.params.layers", "[9] outside the big model's 0..3"),
    ("guard", {"concept_layer": 1}, "steering.params.concept_layer", "cannot change it"),
    ("guard", {"positive": ["c"]}, "steering.params.positive", "cannot change it"),
    ("guard", {"max_backtrack": "x"}, "steering.params.max_backtrack", "valid integer"),
    ("guard", {"max_backtrack": 10**6}, "steering.params.max_backtrack", "less than or equal"),
    ("proxy", {"expert": "nope"}, "steering.params.expert", "uses expert 'positive'"),
    ("proxy", {"alpha": -1e30}, "steering.params.alpha", "greater than or equal to -100"),
    ("contrastive", {"beta": -1e30}, "steering.params.beta", "greater than or equal to 0"),
    ("contrastive", {"beta": 1e9}, "steering.params.beta", "less than or equal to 100"),
    ("contrastive", {"plausibility_alpha": 2}, "steering.params.plausibility_alpha", "1"),
    ("own", {"anything": 1}, "steering.params.anything", "has no parameter 'anything'"),
]


@pytest.mark.parametrize("policy,params,param,words", BAD)
def test_bad_params_are_refused_naming_the_field(admission, policy, params, param, words):
    with pytest.raises(PolicyParamsError) as err:
        admission.check(policy, params)
    assert err.value.param == param
    assert words in str(err.value) and f"'{policy}'" in str(err.value)


def test_good_params_pass_and_name_their_vectors(admission):
    assert admission.check("guard", {"threshold": 0.7, "window": 4, "coeff": -100,
                                     "layers": [0, 3], "max_backtrack": 4}) == []
    assert admission.check("guard", {"vector": "other"}) == ["other"]  # checked by the caller
    assert admission.check("guard", {"concept_layer": 0}) == []  # the config's value: fine
    assert admission.check("proxy", {"alpha": 2.5, "expert": "positive"}) == []
    assert admission.check("contrastive", {}) == []
    assert admission.check("own", {}) == []


def test_the_steerer_reads_params_the_same_way(admission):
    """The runtime's params_for types through the same classmethod: what the edge refuses,
    the Steerer refuses too (a request that reaches it by another path)."""
    from models.steering.policies import policy_class

    kind, defaults = admission.policies["contrastive"]
    assert kind is policy_class("contrastive")
    assert kind.typed_params("contrastive", defaults, {"beta": 2.0}).beta == 2.0
    with pytest.raises(PolicyParamsError):
        kind.typed_params("contrastive", defaults, {"beta": "x"})
