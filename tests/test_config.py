"""The one config schema: defaults, the shipped serve_config.yaml, and readable refusals."""

from __future__ import annotations

import pytest

from models.config import ConfigError, TandemConfig, load_config
from tests.conftest import default_app_args


def test_shipped_config_is_valid_and_fits_two_cpus():
    cfg = load_config(default_app_args())
    d = cfg.deployments
    cpus = sum(x.num_cpus * x.num_replicas for x in (d.ingress, d.router, d.retriever, d.generator, d.steerer))
    assert cpus <= 2, "the default app must schedule on a 2-core machine"
    assert {a.name for a in cfg.adapters} == {"rewrite", "qa", "list"}
    assert all(a.examples and a.description for a in cfg.adapters)
    assert cfg.steering.vectors and cfg.steering.policies


def test_unknown_keys_are_named_with_the_allowed_ones():
    with pytest.raises(ConfigError) as err:
        load_config({"engine": {"blok_size": 8}, "deployments": {"generatr": {}}})
    text = str(err.value)
    assert "unknown key 'engine.blok_size'" in text and "block_size" in text
    assert "unknown key 'deployments.generatr'" in text and "generator" in text


def test_bad_values_name_their_key():
    with pytest.raises(ConfigError) as err:
        load_config({"engine": {"block_size": 0}, "router": {"threshold": 2}})
    assert "engine.block_size" in str(err.value) and "router.threshold" in str(err.value)


def test_ray_options_from_config():
    cfg = load_config({"deployments": {
        "generator": {"num_replicas": 2, "num_gpus": 1, "env": {"OMP_NUM_THREADS": "4"}},
        "router": {"autoscaling": {"min_replicas": 1, "max_replicas": 4}}}})
    gen = cfg.deployments.generator.ray_options()
    assert gen["num_replicas"] == 2 and gen["ray_actor_options"]["num_gpus"] == 1
    assert gen["ray_actor_options"]["runtime_env"]["env_vars"] == {"OMP_NUM_THREADS": "4"}
    router = cfg.deployments.router.ray_options()
    assert router["num_replicas"] == "auto" and router["autoscaling_config"]["max_replicas"] == 4


def test_every_field_is_described():
    def walk(model, path=""):
        for name, field in model.model_fields.items():
            ann = field.annotation
            sub = next((a for a in (ann, *getattr(ann, "__args__", ())) if hasattr(a, "model_fields")), None)
            if sub is None:
                assert field.description, f"{path}{name} has no description"
            else:
                walk(sub, f"{path}{name}.")

    walk(TandemConfig)
