"""The bytes of uploaded files, as uploaded: `<directory>/<file_id>`, each written atomically."""

from __future__ import annotations

import os
from collections.abc import Container

from models.retrieval.disk import remove_old_files, unlink_quietly, write_atomically


class BlobStore:
    """One file per upload under `directory`; the catalogue says which ids exist."""

    def __init__(self, directory: str):
        self.directory = directory
        os.makedirs(directory, exist_ok=True)

    def path(self, file_id: str) -> str:
        return os.path.join(self.directory, file_id)

    def write(self, file_id: str, data: bytes) -> None:
        write_atomically(self.path(file_id), data)

    def read(self, file_id: str) -> bytes:
        with open(self.path(file_id), "rb") as f:
            return f.read()

    def delete(self, file_id: str) -> None:
        unlink_quietly(self.path(file_id))

    def remove_orphans(self, file_ids: Container[str], min_age_s: float) -> None:
        """Remove bytes whose id is not in `file_ids` (an upload that crashed before its commit)
        once they are `min_age_s` old."""
        remove_old_files(self.directory, file_ids, min_age_s)
