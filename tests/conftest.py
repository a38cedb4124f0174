"""Shared fixtures: the built-in tiny checkpoint, and a real Ray Serve app on a free port."""

from __future__ import annotations

import copy
import os
import socket
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
