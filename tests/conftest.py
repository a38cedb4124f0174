"""Shared fixtures: the built-in tiny checkpoint, and a real Ray Serve app on a free port."""

from __future__ import annotations

import copy
import os
import random
import socket
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def default_app_args() -> dict:
    """The `args:` of the default application in serve_config.yaml."""
    with open(ROOT / "serve_config.yaml") as f:
        cfg = yaml.safe_load(f)
    return copy.deepcopy(cfg["applications"][0]["args"])


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A port free now that nothing else will be handed before its user binds it.

    A port from bind(0) comes from the kernel's ephemeral range (32768-60999 here), the range
    every process Ray starts at ray.init draws its own ports from, so one picked before can be
    taken before HAProxy binds it (CI once: "cannot bind socket (Address already in use)"). Ray's
    workers take 10002-19999 and Serve's replicas their HTTP ports from 30000 (throughput mode):
    20000-29999 is left to ports chosen by hand like these.
    """
    rng = random.Random(os.getpid() ^ time.monotonic_ns())
    for _ in range(200):
        port = rng.randrange(20000, 30000)
        if port in _HANDED_OUT:
            continue
        with socket.socket() as s:
            try:
                s.bind(("0.0.0.0", port))  # HAProxy binds its stats port on every address
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    raise RuntimeError("no free port in 20000-29999")
