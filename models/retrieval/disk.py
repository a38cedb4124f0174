"""Atomic writes and quiet deletes, shared by the blob store and the FAISS indexes."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Container


def write_atomically(path: str, data: bytes) -> None:
    """Write `data` to `path` whole or not at all: a temp file beside it, fsync, os.replace."""
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(path) or ".")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        unlink_quietly(tmp)
        raise


def unlink_quietly(path: str) -> None:
    """Remove `path` if it is there."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def remove_old_files(directory: str, keep: Container[str], min_age_s: float) -> None:
    """Remove files of `directory` not named in `keep` and not modified for `min_age_s` seconds
    (younger ones may belong to a write another process has not committed yet)."""
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        if name not in keep and _age_s(path) > min_age_s:
            unlink_quietly(path)


def _age_s(path: str) -> float:
    try:
        return time.time() - os.path.getmtime(path)
    except FileNotFoundError:
        return 0.0
