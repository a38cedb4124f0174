"""Retrieval quality on a labelled set: 76 everyday questions over 25 short documents
(tests/data/retrieval_qa.jsonl, retrieval_docs.jsonl). A hit is relevant when it comes from the
labelled document and contains the labelled answer passage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from models.embedding import shared_embedder
from models.retrieval.search import SearchRequest
from models.retrieval.store import DocumentStore

DATA = Path(__file__).resolve().parents[1] / "data"
STRATEGIES = {
    "auto": None,
    "static-100": {
        "type": "static",
        "static": {"max_chunk_size_tokens": 100, "chunk_overlap_tokens": 20},
    },
}


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One torch thread: on this shared 2-core machine two threads run the embedder ~10x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _jsonl(name: str) -> list[dict]:
    with open(DATA / name) as f:
        return [json.loads(line) for line in f if line.strip()]


def ranks_of_answers(store: DocumentStore, chunking: dict | None) -> list[int | None]:
    """For each question, the rank (1-based) of the first relevant hit in the top 10, or None."""
    docs, questions = _jsonl("retrieval_docs.jsonl"), _jsonl("retrieval_qa.jsonl")
    doc_of_file = {store.create_file(d["filename"], d["text"].encode()).id: d["id"] for d in docs}
    vs = store.create_vector_store("qa", list(doc_of_file), chunking_strategy=chunking)
    found = store.search_many([SearchRequest([vs.id], q["question"], 10) for q in questions])
    ranks = []
    for q, hits in zip(questions, found, strict=True):
        relevant = (
            n
            for n, h in enumerate(hits, 1)
            if doc_of_file[h.file_id] == q["doc_id"] and q["answer"] in h.text
        )
        ranks.append(next(relevant, None))
    return ranks


def recall_at(ranks: list[int | None], k: int) -> float:
    return sum(1 for r in ranks if r is not None and r <= k) / len(ranks)


def mean_reciprocal_rank(ranks: list[int | None]) -> float:
    return sum(1 / r for r in ranks if r is not None) / len(ranks)


def test_dataset_is_large_and_labels_point_into_documents():
    docs = {d["id"]: d["text"] for d in _jsonl("retrieval_docs.jsonl")}
    questions = _jsonl("retrieval_qa.jsonl")
    assert len(docs) >= 20 and len(questions) >= 50
    assert all(q["answer"] in docs[q["doc_id"]] for q in questions)


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_recall_at_5_and_mrr(tmp_path, strategy):
    store = DocumentStore(str(tmp_path / "data"), shared_embedder())
    ranks = ranks_of_answers(store, STRATEGIES[strategy])
    recall1, recall5, mrr = recall_at(ranks, 1), recall_at(ranks, 5), mean_reciprocal_rank(ranks)
    print(
        f"\n{strategy}: recall@1={recall1:.3f} recall@5={recall5:.3f} MRR={mrr:.3f} (n={len(ranks)})"
    )
    assert recall5 >= 0.9
    assert mrr >= 0.75
    store.close()


def test_builtin_world_questions_find_their_document(tmp_path):
    world = pytest.importorskip("models.builtin.world")
    if not hasattr(world, "world_questions"):
        pytest.skip("models.builtin.world has no world_questions yet")
    from models.retrieval.service import BUILTIN_STORE_ID, ensure_builtin_store

    store = DocumentStore(str(tmp_path / "data"), shared_embedder())
    assert ensure_builtin_store(store, world.world_documents())
    questions = world.world_questions()
    requests = [SearchRequest([BUILTIN_STORE_ID], q, 4) for q, _, _ in questions]
    found = sum(
        any(h.filename == f"{title}.txt" for h in hits)
        for (_, _, title), hits in zip(questions, store.search_many(requests), strict=True)
    )
    recall4 = found / len(questions)
    print(f"\nworld: recall@4={recall4:.3f} (n={len(questions)})")
    assert recall4 >= 0.8
    store.close()
