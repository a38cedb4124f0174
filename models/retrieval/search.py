"""Search over the vector stores' indexes: the nearest chunks to each query, best first, with
their text and source looked up in the catalogue."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from models.retrieval.catalogue import Catalogue
from models.retrieval.errors import InvalidRequest
from models.retrieval.filters import check_filter, matches
from models.retrieval.index import VectorStoreIndexes
from models.retrieval.records import SearchHit

MAX_NUM_RESULTS = 50


@dataclass(frozen=True)
class SearchRequest:
    """One query against some vector stores (the unit `search_many` batches)."""

    vector_store_ids: Sequence[str]
    query: str
    max_num_results: int = 10
    score_threshold: float = 0.0
    filters: dict | None = None  # on file attributes (models.retrieval.filters)


def check_search_request(request: SearchRequest) -> None:
    """InvalidRequest for a request that names no store, asks for 0 or > 50 hits, or is empty."""
    if not request.vector_store_ids:
        raise InvalidRequest("name at least one vector store to search", param="vector_store_ids")
    if not 1 <= request.max_num_results <= MAX_NUM_RESULTS:
        raise InvalidRequest(
            f"max_num_results must be from 1 to {MAX_NUM_RESULTS}, got {request.max_num_results}",
            param="max_num_results",
        )
    if not request.query.strip():
        raise InvalidRequest("the search query is empty", param="query")
    if request.filters is not None:
        check_filter(request.filters)


def search_indexes(
    requests: Sequence[SearchRequest],
    vectors: np.ndarray,
    catalogue: Catalogue,
    indexes: VectorStoreIndexes,
) -> list[list[SearchHit]]:
    """Hits for each request, best first; `vectors[i]` is `requests[i]`'s query embedding.

    One FAISS search per store for all the requests that name it; NotFoundError if a store does
    not exist.
    """
    store_ids = sorted({s for r in requests for s in r.vector_store_ids})
    versions = catalogue.store_versions(store_ids)
    candidates: list[list[tuple[float, int]]] = [[] for _ in requests]
    for store_id in store_ids:
        rows = [i for i, r in enumerate(requests) if store_id in r.vector_store_ids]
        k = max(requests[i].max_num_results for i in rows)
        if any(requests[i].filters for i in rows):  # filtered: every chunk is a candidate
            k = max(k, indexes.size(store_id, versions[store_id]))
        found = indexes.search(store_id, versions[store_id], vectors[rows], k)
        if found is None:
            continue
        for row, row_scores, row_ids in zip(rows, *found, strict=True):
            candidates[row].extend(
                (float(s), int(i)) for s, i in zip(row_scores, row_ids, strict=True) if i >= 0
            )
    chunks = catalogue.chunks_by_id({i for found in candidates for _, i in found})
    return [
        _best_hits(request, found, chunks)
        for request, found in zip(requests, candidates, strict=True)
    ]


def _best_hits(
    request: SearchRequest, found: list[tuple[float, int]], chunks: dict[int, dict]
) -> list[SearchHit]:
    """The request's top hits over the threshold, by score then chunk id; chunks deleted since
    the index was searched are left out."""
    found.sort(key=lambda pair: (-pair[0], pair[1]))
    hits = [
        SearchHit(score=score, **chunks[chunk_id])
        for score, chunk_id in found
        if score >= request.score_threshold and chunk_id in chunks
        and matches(request.filters, chunks[chunk_id].get("attributes") or {})
    ]
    return hits[: request.max_num_results]
