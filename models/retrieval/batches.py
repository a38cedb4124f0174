"""Vector store file batches (`/v1/vector_stores/{id}/file_batches`): several files attached in
one call, each with its own attributes and chunking strategy, as OpenAI's API has them.

Attaching is synchronous here, so a batch is finished when its create call answers (`status`
completed, or failed when no file could be attached); the SDK's `create_and_poll` and
`upload_and_poll` see it finished at their first poll. A file that fails (unreadable, no text)
fails alone: the batch records its error and lists it with status failed.
"""

from __future__ import annotations

import uuid
from typing import Any

from models.retrieval.errors import InvalidRequest, RetrievalError
from models.retrieval.store import DocumentStore

MAX_BATCH_FILES = 500


def create_file_batch(store: DocumentStore, vector_store_id: str, files: list[dict[str, Any]]) -> dict:
    """Attach `files` ({file_id, attributes?, chunking_strategy?}) and record the batch.
    An unknown store or file is a 404 before anything is attached."""
    if not 1 <= len(files) <= MAX_BATCH_FILES:
        raise InvalidRequest(f"a batch holds 1 to {MAX_BATCH_FILES} files, got {len(files)}",
                             param="file_ids")  # fmt: skip
    store.retrieve_vector_store(vector_store_id)
    for f in files:
        store.retrieve_file(f["file_id"])
    failed: dict[str, str] = {}
    for f in files:
        try:
            store.attach_file(vector_store_id, f["file_id"], f.get("chunking_strategy"),
                              f.get("attributes"))  # fmt: skip
        except RetrievalError as exc:
            failed[f["file_id"]] = exc.message
    batch_id = f"vsfb_{uuid.uuid4().hex}"
    store.catalogue.add_batch(batch_id, vector_store_id, [f["file_id"] for f in files], failed)
    return retrieve_file_batch(store, vector_store_id, batch_id)


def retrieve_file_batch(store: DocumentStore, vector_store_id: str, batch_id: str) -> dict:
    created_at, file_ids, failed = store.catalogue.batch(vector_store_id, batch_id)
    done = sum(1 for f in set(file_ids) if f not in failed
               and store.catalogue.attachment(vector_store_id, f) is not None)  # fmt: skip
    return {
        "id": batch_id, "object": "vector_store.files_batch", "created_at": created_at,
        "vector_store_id": vector_store_id, "status": "completed" if done or not failed else "failed",
        "file_counts": {"in_progress": 0, "completed": done, "failed": len(failed),
                        "cancelled": 0, "total": len(set(file_ids))},
    }  # fmt: skip


def file_batch_files(store: DocumentStore, vector_store_id: str, batch_id: str,
                     status: str | None = None) -> list[dict]:  # fmt: skip
    """The batch's files as vector store files, oldest first; a failed one with its error."""
    _, file_ids, failed = store.catalogue.batch(vector_store_id, batch_id)
    out = []
    for file_id in dict.fromkeys(file_ids):
        if file_id in failed:
            record = {"id": file_id, "object": "vector_store.file", "created_at": 0,
                      "vector_store_id": vector_store_id, "status": "failed", "usage_bytes": 0,
                      "last_error": {"code": "invalid_file", "message": failed[file_id]},
                      "chunking_strategy": None, "attributes": {}}  # fmt: skip
        elif (attached := store.catalogue.attachment(vector_store_id, file_id)) is not None:
            record = attached.to_openai()
        else:  # detached since
            continue
        if status is None or record["status"] == status:
            out.append(record)
    return out


def cancel_file_batch(store: DocumentStore, vector_store_id: str, batch_id: str) -> dict:
    """Batches finish within their create call: there is never one left to cancel."""
    retrieve_file_batch(store, vector_store_id, batch_id)
    raise InvalidRequest(f"file batch '{batch_id}' has already finished; nothing to cancel",
                         param="batch_id")  # fmt: skip
