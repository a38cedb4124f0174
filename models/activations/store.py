"""The activation store: per-token rows of the requests that opt in
(`tandem: {activations: {..., store: true}}`), one Parquet file per request under
`activation_store.dir`, the oldest files deleted past `max_bytes` or `max_files`.

A row is one generated token of one choice: `request_id`, `choice`, `position` (index among
the choice's generated tokens), `token_id`, `token` (its text), `time` (UTC, when the request
ended), then what the request read: `probe_<name>` (float64, P(concept)), `features` (list of
{index, name, activation}: its top SAE features), `layer_<l>` (list of float32: the residual
stream after block l). Query the directory with DuckDB (`read_parquet('<dir>/*.parquet',
union_by_name = true)`) or pandas (`pd.read_parquet(<dir>)`); see the README.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class ActivationStoreConfig(BaseModel):
    """The `activation_store:` block: where opted-in requests' activations go, and how much."""

    model_config = ConfigDict(extra="forbid")

    dir: str | None = Field(
        None, description="Directory of the Parquet files (one per request); None = no store "
        "(a request asking for `store: true` gets a 400). Needs pyarrow (the `store` extra).",
    )  # fmt: skip
    max_bytes: int = Field(1 << 30, ge=1, description="Bytes of files kept; the oldest go first.")
    max_files: int = Field(10000, ge=1, description="Files kept; the oldest go first.")


class ActivationStore:
    """Writes one request's rows as one Parquet file, then enforces the retention limits."""

    def __init__(self, config: ActivationStoreConfig):
        import pyarrow  # noqa: F401 - fail at start, not at the first stored request

        if config.dir is None:
            raise ValueError("activation_store.dir is not set")
        self.root = Path(config.dir).expanduser()
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_bytes, self.max_files = config.max_bytes, config.max_files
        self._lock = threading.Lock()

    def write(self, request_id: str, rows: list[dict[str, Any]]) -> Path | None:
        """Store these rows (blocking: run it in a thread); None when there are none."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not rows:
            return None
        stamp = datetime.now(UTC)
        table = pa.Table.from_pylist([{"request_id": request_id, **r, "time": stamp} for r in rows])
        # time-ordered names: retention deletes the oldest first, whatever the clock of mtime
        name = f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.parquet"
        tmp = self.root / f".{name}.tmp"
        pq.write_table(table, tmp)
        os.replace(tmp, self.root / name)
        self.enforce_retention()
        return self.root / name

    def files(self) -> list[Path]:
        """The store's files, oldest first."""
        return sorted(self.root.glob("*.parquet"))

    def enforce_retention(self) -> None:
        with self._lock:
            files = self.files()
            sizes = [p.stat().st_size if p.exists() else 0 for p in files]
            total = sum(sizes)
            for path, size in zip(files, sizes, strict=True):
                if len(files) <= self.max_files and total <= self.max_bytes:
                    break
                path.unlink(missing_ok=True)
                files = files[1:]
                total -= size


def token_rows(choice: int, token_ids: list[int], tokens: list[str],
               activations: dict[str, Any]) -> list[dict[str, Any]]:  # fmt: skip
    """One choice's rows from its token ids, texts and its `tandem.activations` object (the
    response's: the same scores and features the client got)."""
    import base64

    import numpy as np

    rows = []
    for i, (tid, text) in enumerate(zip(token_ids, tokens, strict=True)):
        row: dict[str, Any] = {"choice": choice, "position": i, "token_id": tid, "token": text}
        for name, scores in activations.get("probes", {}).items():
            row[f"probe_{name}"] = scores[i]
        if "features" in activations:
            row["features"] = activations["features"][i]
        raw = activations.get("tokens")
        for j, layer in enumerate(activations.get("layers", [])):
            vec = None
            if raw[i] is not None:
                vec = np.frombuffer(base64.b64decode(raw[i]), "<f2").reshape(
                    activations["shape"])[j].astype("float32").tolist()  # fmt: skip
            row[f"layer_{layer}"] = vec
        rows.append(row)
    return rows
