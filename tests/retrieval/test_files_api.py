"""The Files and Vector Stores routes through the real `openai` SDK, against a FastAPI app built
from `build_files_router` over an in-process Retriever, served by uvicorn on a loopback port."""

from __future__ import annotations

import socket
import threading
import time

import openai
import pytest
import uvicorn
from fastapi import FastAPI

from deployments.files_api import build_files_router
from models.embedding import shared_embedder
from models.retrieval.service import InProcessHandle, RetrieverService, ensure_builtin_store

UPLOAD_LIMIT = 64 * 1024


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One torch thread: on this shared 2-core machine two threads run the embedder ~10x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("retrieval"))
    config = {"data_dir": data_dir, "builtin_documents": False, "max_file_bytes": UPLOAD_LIMIT}
    return RetrieverService(config, embedder=shared_embedder())


@pytest.fixture(scope="module")
def client(service):
    app = FastAPI()
    handle = InProcessHandle(service)
    app.include_router(build_files_router(lambda: handle, max_upload_bytes=UPLOAD_LIMIT))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    assert server.started, "uvicorn did not start"
    yield openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
    server.should_exit = True
    thread.join(timeout=10)


BEES = b"Honey bees communicate the direction of flowers with a waggle dance.\n\nA hive keeps its brood at about 35 degrees Celsius."
OVEN = b"# Oven care\n\nClean the oven with a paste of **baking soda** and water left overnight."


def test_files_round_trip(client):
    uploaded = client.files.create(file=("bees.txt", BEES), purpose="assistants")
    assert uploaded.id.startswith("file-") and uploaded.bytes == len(BEES)
    assert uploaded.filename == "bees.txt" and uploaded.purpose == "assistants"
    assert client.files.retrieve(uploaded.id) == uploaded
    assert uploaded.id in [f.id for f in client.files.list()]
    assert client.files.content(uploaded.id).content == BEES

    deleted = client.files.delete(uploaded.id)
    assert deleted.deleted and deleted.id == uploaded.id
    with pytest.raises(openai.NotFoundError) as info:
        client.files.retrieve(uploaded.id)
    error = info.value.body
    assert error["code"] == "not_found" and uploaded.id in error["message"]
    assert error["type"] == "not_found_error" and "param" in error


def test_vector_store_attach_search_delete(client):
    bees = client.files.create(file=("bees.txt", BEES), purpose="assistants")
    oven = client.files.create(file=("oven.md", OVEN), purpose="assistants")
    store = client.vector_stores.create(name="home", file_ids=[bees.id])
    assert store.status == "completed" and store.file_counts.completed == 1
    assert store.name == "home" and store.usage_bytes > 0

    attached = client.vector_stores.files.create(
        vector_store_id=store.id,
        file_id=oven.id,
        chunking_strategy={
            "type": "static",
            "static": {"max_chunk_size_tokens": 100, "chunk_overlap_tokens": 20},
        },
    )
    assert attached.status == "completed" and attached.vector_store_id == store.id
    assert attached.chunking_strategy.static.max_chunk_size_tokens == 100
    listed = client.vector_stores.files.list(vector_store_id=store.id)
    assert {f.id for f in listed} == {bees.id, oven.id}
    assert client.vector_stores.retrieve(store.id).file_counts.total == 2
    assert store.id in [s.id for s in client.vector_stores.list()]

    page = client.vector_stores.search(
        vector_store_id=store.id,
        query="how do bees tell each other where flowers are?",
        max_num_results=2,
    )
    results = list(page)
    assert results[0].file_id == bees.id and results[0].filename == "bees.txt"
    assert "waggle dance" in results[0].content[0].text and 0 < results[0].score <= 1
    high = client.vector_stores.search(
        vector_store_id=store.id, query="bees", ranking_options={"score_threshold": 0.99}
    )
    assert list(high) == []

    client.files.delete(bees.id)
    after = list(
        client.vector_stores.search(vector_store_id=store.id, query="waggle dance of bees")
    )
    assert all(r.file_id != bees.id for r in after)

    assert client.vector_stores.delete(store.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.vector_stores.retrieve(store.id)


def test_errors_have_openai_shape_and_status(client):
    cases = [
        (415, "unsupported_file", ("tool.exe", b"MZ\x90\x00")),
        (413, "file_too_large", ("big.txt", b"x" * (UPLOAD_LIMIT + 1))),
        (400, "invalid_file", ("empty.txt", b"")),
        (400, "invalid_file", ("noise.txt", bytes(range(256)) * 8)),
        (400, "invalid_file", ("broken.pdf", b"%PDF-1.7\n%broken")),
    ]
    for status, code, upload in cases:
        with pytest.raises(openai.APIStatusError) as info:
            client.files.create(file=upload, purpose="assistants")
        assert info.value.status_code == status, upload[0]
        assert info.value.body["code"] == code and upload[0] in info.value.body["message"]

    with pytest.raises(openai.NotFoundError):
        client.vector_stores.files.create(vector_store_id="vs_nope", file_id="file-nope")
    store = client.vector_stores.create(name="empty")
    with pytest.raises(openai.BadRequestError) as info:
        client.vector_stores.files.create(
            vector_store_id=store.id,
            file_id=client.files.create(file=("a.txt", b"some words"), purpose="assistants").id,
            chunking_strategy={
                "type": "static",
                "static": {"max_chunk_size_tokens": 800, "chunk_overlap_tokens": 400},
            },
        )
    assert info.value.body["param"] == "chunking_strategy.static.max_chunk_size_tokens"
    with pytest.raises(openai.BadRequestError) as info:
        client.vector_stores.search(vector_store_id=store.id, query="x", max_num_results=500)
    assert info.value.body["param"] == "max_num_results"


def test_embed_for_the_embeddings_route(service):
    vectors = service.embed(["a red kite", "a blue kite", "tax law"])
    assert len(vectors) == 3 and len(vectors[0]) == 384
    similar = sum(a * b for a, b in zip(vectors[0], vectors[1], strict=True))
    unrelated = sum(a * b for a, b in zip(vectors[0], vectors[2], strict=True))
    assert similar > unrelated
    counted, tokens = service.embed_counted(["a red kite", "x " * 400])
    assert counted[0] == pytest.approx(vectors[0], abs=1e-5) and tokens == 5 + 256  # [CLS] a red kite [SEP]; cut at 256


def test_builtin_store_is_created_once_and_persists(tmp_path):
    from models.retrieval.store import DocumentStore

    docs = [
        {"title": "Lighthouses", "text": "A lighthouse keeper once trimmed the lamp wick nightly."},
        ("ferries.md", "# Ferries\n\nThe morning ferry leaves the harbour at seven."),
    ]
    data_dir = str(tmp_path / "data")
    store = DocumentStore(data_dir, shared_embedder())
    assert ensure_builtin_store(store, docs) is True
    assert ensure_builtin_store(store, docs) is False
    store.close()
    again = DocumentStore(data_dir, shared_embedder())
    world = again.retrieve_vector_store("world")
    assert world.file_counts["completed"] == 2
    hit = again.search(["world"], "when does the boat leave port?", 1)[0]
    assert hit.filename == "ferries.md"
    assert {f.filename for f in again.list_files()} == {"Lighthouses.txt", "ferries.md"}
    again.close()


def test_search_filters_keep_only_matching_files(client):
    store = client.vector_stores.create(name="filtered")
    files = {}
    for name, attrs in (("bees.txt", {"topic": "nature", "year": 2021}),
                        ("oven.md", {"topic": "kitchen", "year": 2024})):  # fmt: skip
        text = BEES if name == "bees.txt" else OVEN
        files[name] = client.files.create(file=(name, text), purpose="assistants").id
        client.vector_stores.files.create(vector_store_id=store.id, file_id=files[name],
                                          attributes=attrs)  # fmt: skip

    def found(filters) -> set[str]:
        page = client.vector_stores.search(vector_store_id=store.id, filters=filters,
                                           query="how do bees tell where flowers are?")
        return {r.file_id for r in page}

    assert found({"type": "eq", "key": "topic", "value": "kitchen"}) == {files["oven.md"]}
    assert found({"type": "gte", "key": "year", "value": 2022}) == {files["oven.md"]}
    assert found({"type": "or", "filters": [{"type": "eq", "key": "topic", "value": "nature"},
                                            {"type": "lt", "key": "year", "value": 2000}]}) == {
        files["bees.txt"]}
    assert found({"type": "and", "filters": [{"type": "in", "key": "topic", "value": ["nature"]},
                                             {"type": "ne", "key": "year", "value": 2021}]}) == set()
    with pytest.raises(openai.BadRequestError, match="filter"):
        found({"type": "like", "key": "topic", "value": "k"})


def test_file_batch_attaches_several_files_with_attributes(client):
    store = client.vector_stores.create(name="batched")
    bees = client.files.create(file=("bees.txt", BEES), purpose="assistants").id
    oven = client.files.create(file=("oven.md", OVEN), purpose="assistants").id
    batch = client.vector_stores.file_batches.create_and_poll(
        vector_store_id=store.id, file_ids=[bees, oven], attributes={"shelf": "a"})
    assert batch.status == "completed" and batch.file_counts.completed == 2
    assert batch.file_counts.total == 2 and batch.file_counts.failed == 0
    assert client.vector_stores.file_batches.retrieve(batch.id, vector_store_id=store.id) == batch
    listed = client.vector_stores.file_batches.list_files(batch.id, vector_store_id=store.id)
    assert {f.id for f in listed} == {bees, oven}
    assert all(f.attributes == {"shelf": "a"} for f in listed)
    page = client.vector_stores.search(vector_store_id=store.id, query="oven paste",
                                       filters={"type": "eq", "key": "shelf", "value": "a"})
    assert {r.file_id for r in page} == {bees, oven}
    per_file = client.vector_stores.file_batches.create(vector_store_id=store.id, files=[
        {"file_id": oven, "attributes": {"shelf": "b"}}])  # already attached: kept as it was
    assert per_file.file_counts.completed == 1
    other = client.vector_stores.create(name="half-failed")
    overlap = {"type": "static", "static": {"max_chunk_size_tokens": 100, "chunk_overlap_tokens": 90}}
    mixed = client.vector_stores.file_batches.create(vector_store_id=other.id, files=[
        {"file_id": bees}, {"file_id": oven, "chunking_strategy": overlap}])
    assert (mixed.status, mixed.file_counts.completed, mixed.file_counts.failed) == ("completed", 1, 1)
    failed = client.vector_stores.file_batches.list_files(mixed.id, vector_store_id=other.id,
                                                          filter="failed").data
    assert [f.id for f in failed] == [oven] and "overlap" in failed[0].last_error.message
    with pytest.raises(openai.NotFoundError, match="file-nope"):
        client.vector_stores.file_batches.create(vector_store_id=store.id, file_ids=["file-nope"])
    with pytest.raises(openai.BadRequestError, match="not both"):
        client.vector_stores.file_batches.create(vector_store_id=store.id, file_ids=[bees],
                                                 files=[{"file_id": bees}])
    with pytest.raises(openai.BadRequestError, match="nothing to cancel"):
        client.vector_stores.file_batches.cancel(batch.id, vector_store_id=store.id)
    with pytest.raises(openai.NotFoundError):
        client.vector_stores.file_batches.retrieve("vsfb_nope", vector_store_id=store.id)
