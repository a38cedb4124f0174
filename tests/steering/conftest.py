"""Fixtures the steering tests share."""

from __future__ import annotations

import pytest

from models.builtin import ModelSourceError, resolve_source


@pytest.fixture(scope="module")
def toy():
    """The trained toy-world models' paths (skips where they are not built)."""
    try:
        return resolve_source("builtin:toy")
    except ModelSourceError as exc:
        pytest.skip(str(exc))
