"""DocumentStore on the real embedder and real FAISS: upload, attach, search, delete, restart,
bad input, concurrent uploads, and crashes between writes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest

from models.embedding import shared_embedder
from models.retrieval import store as store_module
from models.retrieval.catalogue import Catalogue
from models.retrieval.chunking import chunk_text, resolve_chunking_strategy
from models.retrieval.errors import (
    BadFile,
    FileTooLarge,
    InvalidRequest,
    NotFoundError,
    UnsupportedFileType,
)
from models.retrieval.index import VectorIndex
from models.retrieval.prompt import format_sources, sources_for_response
from models.retrieval.store import DocumentStore

ROOT = Path(__file__).resolve().parents[2]
SMALL_CHUNKS = {
    "type": "static",
    "static": {"max_chunk_size_tokens": 48, "chunk_overlap_tokens": 8},
}

GARDEN = (
    "Tomatoes need six to eight hours of direct sun a day. Water them deeply at the base.\n\n"
    "Blossom end rot is a dark sunken patch on the bottom of the fruit. It comes from irregular "
    "watering, which stops the plant taking up calcium evenly.\n\n"
    "Pinch out the side shoots of cordon varieties and tie the main stem to a stake."
)
KITCHEN = (
    "Rinse white rice until the water runs clear, then cook one cup of rice in one and a half "
    "cups of water for fifteen minutes on the lowest heat.\n\n"
    "Green tea wants water of about seventy to eighty degrees; boiling water makes it bitter."
)
CARS = (
    "Check the tyre pressure of your car once a month when the tyres are cold. "
    "The legal minimum tread depth is 1.6 millimetres."
)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One torch thread: on this shared 2-core machine two threads run the embedder ~10x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def embedder():
    return shared_embedder()


@pytest.fixture
def store(tmp_path, embedder):
    s = DocumentStore(str(tmp_path / "data"), embedder)
    yield s
    s.close()


def _store_with_docs(store: DocumentStore) -> tuple[str, dict[str, str]]:
    ids = {
        name: store.create_file(name, text.encode()).id
        for name, text in [("garden.txt", GARDEN), ("kitchen.md", KITCHEN)]
    }
    vs = store.create_vector_store("home", list(ids.values()), chunking_strategy=SMALL_CHUNKS)
    return vs.id, ids


def test_upload_attach_search_finds_the_right_chunk(store):
    vs_id, ids = _store_with_docs(store)
    assert store.retrieve_vector_store(vs_id).file_counts["completed"] == 2
    assert store.chunk_count(vs_id) > 2  # small static chunks split the documents

    hits = store.search([vs_id], "why do my tomatoes have black rotten bottoms?", 3)
    assert hits[0].file_id == ids["garden.txt"]
    assert "Blossom end rot" in hits[0].text
    assert hits[0].filename == "garden.txt"
    assert hits == sorted(hits, key=lambda h: -h.score)

    tea = store.search([vs_id], "what temperature for brewing green tea", 1)[0]
    assert tea.file_id == ids["kitchen.md"] and "eighty degrees" in tea.text

    assert store.search([vs_id], "tomatoes", 5, score_threshold=0.99) == []


def test_search_across_stores_and_attach_is_idempotent(store):
    vs_id, _ = _store_with_docs(store)
    car_file = store.create_file("cars.txt", CARS.encode())
    other = store.create_vector_store("cars", [car_file.id])
    again = store.attach_file(other.id, car_file.id)
    assert store.list_vector_store_files(other.id) == [again]
    assert store.chunk_count(other.id) == 1

    hits = store.search([vs_id, other.id], "how deep must tyre tread be", 2)
    assert hits[0].vector_store_id == other.id and "1.6 millimetres" in hits[0].text


def test_delete_removes_from_search(store):
    vs_id, ids = _store_with_docs(store)
    query = "why do my tomatoes have black rotten bottoms?"
    store.delete_file(ids["garden.txt"])
    hits = store.search([vs_id], query, 10)
    assert hits and all(h.file_id == ids["kitchen.md"] for h in hits)
    assert store.retrieve_vector_store(vs_id).file_counts["total"] == 1
    with pytest.raises(NotFoundError):
        store.retrieve_file(ids["garden.txt"])
    assert not os.path.exists(store.blobs.path(ids["garden.txt"]))

    store.detach_file(vs_id, ids["kitchen.md"])
    assert store.search([vs_id], "green tea", 5) == []
    assert store.retrieve_file(ids["kitchen.md"]).filename == "kitchen.md"  # file stays

    store.delete_vector_store(vs_id)
    with pytest.raises(NotFoundError):
        store.search([vs_id], "green tea")


@pytest.mark.parametrize("index_kind", ["flat", "hnsw"])
def test_restart_sees_stores_files_and_identical_results(tmp_path, embedder, index_kind):
    data_dir = str(tmp_path / "data")
    first = DocumentStore(data_dir, embedder, index_kind=index_kind)
    vs_id, ids = _store_with_docs(first)
    first.detach_file(vs_id, ids["kitchen.md"])  # HNSW cannot delete: exercises its rebuild
    first.attach_file(vs_id, ids["kitchen.md"], SMALL_CHUNKS)
    queries = ["black patches on tomato fruit", "how much water for rice", "stake the stem"]
    before = [first.search([vs_id], q, 4) for q in queries]
    stores_before, files_before = first.list_vector_stores(), first.list_files()
    first.close()

    second = DocumentStore(data_dir, embedder, index_kind=index_kind)
    assert second.list_vector_stores() == stores_before
    assert second.list_files() == files_before
    assert second.file_content(ids["garden.txt"]) == GARDEN.encode()
    assert [second.search([vs_id], q, 4) for q in queries] == before
    second.close()


def _files_on_disk(store: DocumentStore) -> list[str]:
    return sorted(os.listdir(store.blobs.directory))


def test_bad_input_is_refused_and_nothing_is_half_indexed(tmp_path, embedder):
    store = DocumentStore(str(tmp_path / "data"), embedder, max_file_bytes=4096)
    vs_id, _ = _store_with_docs(store)
    files, chunks, disk = store.list_files(), store.chunk_count(vs_id), _files_on_disk(store)

    cases = [
        (UnsupportedFileType, 415, "program.exe", b"MZ\x90\x00binary"),
        (UnsupportedFileType, 415, "report.docx", b"PK\x03\x04"),
        (FileTooLarge, 413, "big.txt", b"a" * 5000),
        (BadFile, 400, "empty.txt", b""),
        (BadFile, 400, "blank.md", b"  \n\n \t "),
        (
            BadFile,
            400,
            "garbage.txt",
            bytes(np.random.default_rng(0).integers(0, 256, 3000, np.uint8)),
        ),
        (BadFile, 400, "broken.pdf", b"%PDF-1.4\n1 0 obj << /Type /Catalog >> garbage"),
        (BadFile, 400, "fake.pdf", b"this is not a pdf at all"),
    ]
    for error, status, name, data in cases:
        with pytest.raises(error) as info:
            store.create_file(name, data)
        assert info.value.status_code == status
        assert name in info.value.message  # the message names the file it is about

    with pytest.raises(InvalidRequest):
        store.create_file("notes.txt", b"hello", purpose="fine-tune")
    with pytest.raises(NotFoundError) as info:
        store.attach_file(vs_id, "file-missing")
    assert info.value.status_code == 404 and "file-missing" in info.value.message
    with pytest.raises(NotFoundError):
        store.search(["vs_missing"], "anything")
    bad_strategy = {
        "type": "static",
        "static": {"max_chunk_size_tokens": 800, "chunk_overlap_tokens": 400},
    }
    ok_file = store.create_file("cars.txt", CARS.encode())
    with pytest.raises(InvalidRequest) as info:
        store.attach_file(vs_id, ok_file.id, bad_strategy)
    assert "256" in info.value.message
    store.delete_file(ok_file.id)

    def failing_embed(texts, show_progress=False):
        raise RuntimeError("embedder died")

    good = store.create_file("late.txt", b"A file whose embedding fails half way.")
    store.embedder = type(
        "Broken",
        (),
        {"embed": staticmethod(failing_embed), "dim": 384, "tokenizer": embedder.tokenizer},
    )()
    with pytest.raises(RuntimeError):
        store.attach_file(vs_id, good.id)
    store.embedder = embedder
    store.delete_file(good.id)

    assert store.list_files() == files
    assert store.chunk_count(vs_id) == chunks
    assert store.retrieve_vector_store(vs_id).file_counts["total"] == 2
    assert _files_on_disk(store) == disk
    store.close()


def test_pdf_and_markdown_are_parsed(store):
    pdf = store.create_file(
        "manual.pdf", _text_pdf(["Smoke alarms belong on every floor.", "Test them monthly."])
    )
    md = store.create_file("notes.md", b"# Title\n\nSee [the **guide**](http://x.example) now.")
    vs = store.create_vector_store("docs", [pdf.id, md.id])
    hit = store.search([vs.id], "how often should I test a smoke alarm", 1)[0]
    assert hit.filename == "manual.pdf" and "monthly" in hit.text
    md_hit = store.search([vs.id], "guide", 2)
    assert any(h.text == "Title\n\nSee the guide now." for h in md_hit)


def test_chunks_fit_the_embedder_and_overlap(embedder):
    text = " ".join(
        f"Sentence {i} talks about topic number {i * 7} in some detail." for i in range(80)
    )
    auto = resolve_chunking_strategy(None, 200, 40)
    static = resolve_chunking_strategy(SMALL_CHUNKS, 200, 40)
    for strategy in (auto, static):
        chunks = chunk_text(text, embedder.tokenizer, strategy)
        assert len(chunks) > 3
        assert all(
            embedder.count_word_pieces(c) <= strategy.max_chunk_size_tokens + 2 for c in chunks
        )
        first_words = chunks[1].split()[:3]
        assert " ".join(first_words) in chunks[0]  # neighbours overlap
    auto_chunks = chunk_text(text, embedder.tokenizer, auto)
    assert all(c.endswith(".") for c in auto_chunks)  # auto keeps whole sentences


def test_concurrent_uploads_to_one_store_lose_nothing(tmp_path, embedder):
    data_dir = str(tmp_path / "data")
    store = DocumentStore(data_dir, embedder)
    vs_id = store.create_vector_store("shared").id
    topics = ["volcanoes", "violins", "penguins", "bicycles", "chess", "glaciers", "bees", "kites"]
    errors: list[BaseException] = []

    def upload(topic: str) -> None:
        try:
            text = f"This note is about {topic}. " + f"Facts about {topic} are listed here. " * 6
            f = store.create_file(f"{topic}.txt", text.encode())
            store.attach_file(vs_id, f.id, SMALL_CHUNKS)
        except BaseException as exc:  # surfaced in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=upload, args=(t,)) for t in topics]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    expected = sum(a.chunk_count for a in store.list_vector_store_files(vs_id))
    assert store.retrieve_vector_store(vs_id).file_counts["completed"] == len(topics)
    assert store.chunk_count(vs_id) == expected
    for topic in topics:
        assert store.search([vs_id], f"tell me about {topic}", 1)[0].filename == f"{topic}.txt"
    store.close()
    reopened = DocumentStore(data_dir, embedder)
    assert reopened.chunk_count(vs_id) == expected
    reopened.close()


class SimulatedCrash(BaseException):
    """Stands for the process dying: it is not an Exception, so no handler swallows it."""


def _crash(*args, **kwargs):
    raise SimulatedCrash()


@pytest.mark.parametrize(
    "where", ["inside the transaction", "after commit, before index save", "before index rename"]
)
def test_crash_between_writes_leaves_a_readable_state(tmp_path, embedder, monkeypatch, where):
    data_dir = str(tmp_path / "data")
    store = DocumentStore(data_dir, embedder)
    vs_id, ids = _store_with_docs(store)
    late = store.create_file("cars.txt", CARS.encode())
    before = store.search([vs_id], "tomato fruit rot", 3)

    target = {
        "inside the transaction": (Catalogue, "_insert_chunks"),
        "after commit, before index save": (VectorIndex, "save"),
        "before index rename": (os, "replace"),
    }[where]
    with monkeypatch.context() as patch:
        patch.setattr(*target, _crash)
        with pytest.raises(SimulatedCrash):
            store.attach_file(vs_id, late.id)
    # the crashed store is abandoned, as a dead process would leave it

    reopened = DocumentStore(data_dir, embedder)
    assert reopened.search([vs_id], "tomato fruit rot", 3) == before
    attached = {a.id for a in reopened.list_vector_store_files(vs_id)}
    car_hits = reopened.search([vs_id], "minimum tyre tread depth", 1)
    if where == "inside the transaction":
        assert attached == set(ids.values())  # rolled back: the previous state
        assert car_hits[0].file_id != late.id
    else:
        assert attached == {*ids.values(), late.id}  # committed: the index catches up on load
        assert car_hits[0].file_id == late.id
    on_disk = reopened.indexes.get(vs_id).ids()
    assert sorted(on_disk) == sorted(reopened.catalogue.chunk_ids(vs_id))
    assert not [n for n in os.listdir(reopened.indexes.directory) if n.startswith(".tmp-")]
    reopened.close()


def test_process_killed_mid_transaction_keeps_previous_state(tmp_path, embedder):
    """A real crash: os._exit inside the SQLite transaction, so no rollback code runs."""
    data_dir = str(tmp_path / "data")
    store = DocumentStore(data_dir, embedder)
    vs_id, ids = _store_with_docs(store)
    late = store.create_file("cars.txt", CARS.encode())
    before = store.search([vs_id], "tomato fruit rot", 3)
    store.close()
    script = textwrap.dedent(
        f"""
        import os
        from models.embedding import shared_embedder
        from models.retrieval.catalogue import Catalogue
        from models.retrieval.store import DocumentStore
        original = Catalogue._insert_chunks
        def insert_then_die(self, *args):
            original(self, *args)
            os._exit(17)
        Catalogue._insert_chunks = insert_then_die
        DocumentStore({data_dir!r}, shared_embedder()).attach_file({vs_id!r}, {late.id!r})
        """
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # see one_torch_thread
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, timeout=120
    )
    assert proc.returncode == 17, proc.stderr.decode()[-2000:]
    reopened = DocumentStore(data_dir, embedder)
    assert {a.id for a in reopened.list_vector_store_files(vs_id)} == set(ids.values())
    assert reopened.search([vs_id], "tomato fruit rot", 3) == before
    assert reopened.chunk_count(vs_id) == len(reopened.catalogue.chunk_ids(vs_id))
    reopened.close()


def test_sources_are_numbered_for_the_prompt_and_the_response(store):
    vs_id, _ = _store_with_docs(store)
    hits = store.search([vs_id], "tomato watering", 2)
    prompt = format_sources(hits)
    assert "\n[1] " in prompt and "\n[2] " in prompt and "as [n]" in prompt
    assert " ".join(hits[0].text.split()) in prompt
    sources = sources_for_response(hits)
    assert [s["id"] for s in sources] == [h.chunk_id for h in hits]
    assert set(sources[0]) == {"id", "file_id", "filename", "score", "text"}
    assert format_sources([]) == ""
    as_dicts = [{**h.__dict__} for h in hits]  # hits that crossed a JSON boundary
    assert format_sources(as_dicts) == prompt
    assert sources_for_response(as_dicts) == sources


def test_large_file_logs_embedding_progress(store, caplog, monkeypatch):
    monkeypatch.setattr(store_module, "EMBED_BATCH", 4)
    text = "\n".join(f"Line {i} says something about item {i}." for i in range(40))
    f = store.create_file("many.txt", text.encode())
    vs = store.create_vector_store("many")
    with caplog.at_level("INFO", logger="models.retrieval.store"):
        store.attach_file(
            vs.id,
            f.id,
            {"type": "static", "static": {"max_chunk_size_tokens": 16, "chunk_overlap_tokens": 0}},
        )
    assert any("embedded" in r.message and f.id in r.message for r in caplog.records)


def _text_pdf(lines: list[str]) -> bytes:
    """A minimal valid one-page PDF showing `lines` in Helvetica (pypdf extracts them)."""
    ops = ["BT", "/F1 12 Tf", "72 720 Td", "14 TL"]
    ops += [f"({line}) Tj T*" for line in lines]
    stream = "\n".join([*ops, "ET"]).encode()
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] "
        b"/Resources << /Font << /F1 4 0 R >> >> /Contents 5 0 R >>",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
        b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
    ]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for n, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % n + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % off for off in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (
        len(objects) + 1,
        xref,
    )
    return bytes(out)


def test_two_processes_sharing_a_data_dir_see_each_others_writes(tmp_path, embedder):
    """Two DocumentStores on one data_dir stand for two Retriever replicas."""
    data_dir = str(tmp_path / "data")
    replica_a = DocumentStore(data_dir, embedder)
    replica_b = DocumentStore(data_dir, embedder)
    vs_id = replica_a.create_vector_store("shared").id
    cars = replica_a.create_file("cars.txt", CARS.encode())
    replica_a.attach_file(vs_id, cars.id)
    assert replica_b.search([vs_id], "tyre tread depth", 1)[0].file_id == cars.id

    garden = replica_b.create_file("garden.txt", GARDEN.encode())
    replica_b.attach_file(vs_id, garden.id)
    replica_a.attach_file(vs_id, replica_a.create_file("kitchen.md", KITCHEN.encode()).id)
    for replica in (replica_a, replica_b):
        assert replica.chunk_count(vs_id) == 3
        assert replica.search([vs_id], "tomato rot", 1)[0].file_id == garden.id

    replica_b.delete_file(cars.id)
    assert all(h.file_id != cars.id for h in replica_a.search([vs_id], "tyre tread depth", 3))
    replica_a.close()
    replica_b.close()


def test_chunks_embedded_elsewhere_can_be_attached(store, embedder):
    vs = store.create_vector_store("imported")
    f = store.create_file("import.txt", b"placeholder")
    texts = ["Otters hold hands while sleeping.", "Glass is made from sand."]
    with pytest.raises(InvalidRequest):
        store.attach_embedded_chunks(vs.id, f.id, texts, np.zeros((1, 384), np.float32))
    record = store.attach_embedded_chunks(vs.id, f.id, texts, embedder.embed(texts))
    assert record.chunk_count == 2 and record.chunking_strategy == {"type": "other"}
    assert store.search([vs.id], "sea animals sleeping", 1)[0].text == texts[0]
