"""Retrieval benchmark on this CPU: ingest throughput and search latency.

- ingest: a generated text document through the whole path (parse, chunk, embed with the real
  all-MiniLM-L6-v2, SQLite commit, FAISS add and save), in chunks per second.
- search at 10k and 100k chunks: the stores are filled with synthetic unit vectors clustered
  around random topics (real embeddings of 100k chunks would take most of an hour here). Latency of one query in-process
  (index + chunk fetch, query vector given; and end to end with the query embedding), and of 32
  concurrent queries, batched into one call (as the Retriever's @serve.batch does) against the
  baseline of 32 threads searching one by one.

    python bench/retrieval.py [--sizes 10000 100000] [--ingest-chunks 256] [--threads 1]

Prints a table and writes bench/results/retrieval.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from models.embedding import EMBEDDING_DIM, shared_embedder  # noqa: E402
from models.retrieval.search import SearchRequest  # noqa: E402
from models.retrieval.store import DocumentStore  # noqa: E402

TARGET_P50_MS_100K = 10.0
CONCURRENCY = 32
WORDS = (
    "river garden kettle window lantern bicycle harbour violin meadow pepper candle ladder "
    "orchard thunder pocket marble biscuit feather compass blanket tunnel island mirror saddle "
    "carpet pillow basket engine forest planet rocket castle dragon wizard market bridge tower"
).split()
QUESTIONS = [
    "How much ground coffee should I use for one mug?",
    "What causes blossom end rot on tomatoes?",
    "How often should I test my smoke alarm?",
    "How long should I cool a burn under water?",
    "What is the 50/30/20 budgeting rule?",
    "How do I get a blood stain out of a shirt?",
    "Where is the correct tyre pressure for my car written?",
    "What temperature water should I use for green tea?",
]


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return (time.perf_counter() - start) * 1000


def generated_text(n_sentences: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    paragraphs, sentences = [], []
    for i in range(n_sentences):
        words = rng.choices(WORDS, k=rng.randint(8, 18))
        sentences.append(f"Item {i}: the {' '.join(words)}.")
        if len(sentences) == 6:
            paragraphs.append(" ".join(sentences))
            sentences = []
    paragraphs.append(" ".join(sentences))
    return "\n\n".join(p for p in paragraphs if p)


def bench_ingest(embedder, n_chunks: int) -> dict:
    """Real path, real embeddings: upload a document and attach it with the default `auto`;
    baseline: the embedder alone on the same chunks."""
    with tempfile.TemporaryDirectory() as data_dir:
        store = DocumentStore(data_dir, embedder)
        text = generated_text(n_chunks * 9)  # about 9 sentences fill a 200-piece auto chunk
        start = time.perf_counter()
        f = store.create_file("generated.txt", text.encode())
        vs = store.create_vector_store("ingest")
        attached = store.attach_file(vs.id, f.id)
        seconds = time.perf_counter() - start
        chunks = [h.text for h in store.search([vs.id], "item", 50)]
        store.close()
    start = time.perf_counter()
    embedder.embed(chunks)
    embed_per_s = len(chunks) / (time.perf_counter() - start)
    per_s = attached.chunk_count / seconds
    return {
        "chunks": attached.chunk_count,
        "bytes": len(text.encode()),
        "seconds": round(seconds, 3),
        "chunks_per_s": round(per_s, 1),
        "embedder_alone_chunks_per_s": round(embed_per_s, 1),
        "pipeline_over_embedder": round(per_s / embed_per_s, 3),
    }


def fill_synthetic(store: DocumentStore, vs_id: str, n_chunks: int, rng: np.random.Generator):
    """`n_chunks` synthetic unit vectors in files of 10k chunks; returns the vectors.

    Vectors cluster around topics (one per 100 chunks), as real chunk embeddings do; uniformly
    random 384-d vectors are all nearly equidistant, which no real corpus is.
    """
    per_file = 10_000
    topics = rng.standard_normal((max(1, n_chunks // 100), EMBEDDING_DIM), dtype=np.float32)
    topics /= np.linalg.norm(topics, axis=1, keepdims=True)
    all_vectors = []
    for start in range(0, n_chunks, per_file):
        n = min(per_file, n_chunks - start)
        noise = rng.standard_normal((n, EMBEDDING_DIM), dtype=np.float32) / np.sqrt(EMBEDDING_DIM)
        vectors = topics[rng.integers(0, len(topics), n)] + noise
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        texts = [f"synthetic chunk {start + i}" for i in range(n)]
        f = store.create_file(f"synthetic-{start}.txt", b"synthetic")
        store.attach_embedded_chunks(vs_id, f.id, texts, vectors)
        all_vectors.append(vectors)
    return np.concatenate(all_vectors)


def near_queries(data: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Queries close to stored vectors, as real questions are close to their passages."""
    picks = data[rng.integers(0, len(data), n)]
    q = picks + 0.5 * rng.standard_normal(picks.shape, dtype=np.float32) / np.sqrt(EMBEDDING_DIM)
    return q / np.linalg.norm(q, axis=1, keepdims=True)


def bench_search(embedder, n_chunks: int, index_kind: str, repeats: int) -> dict:
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as data_dir:
        store = DocumentStore(data_dir, embedder, index_kind=index_kind)
        vs_id = store.create_vector_store(f"synthetic-{n_chunks}").id
        start = time.perf_counter()
        data = fill_synthetic(store, vs_id, n_chunks, rng)
        build_s = time.perf_counter() - start
        start = time.perf_counter()
        reopened = DocumentStore(data_dir, embedder, index_kind=index_kind)
        reload_s = time.perf_counter() - start
        reopened.close()

        queries = near_queries(data, repeats, rng)
        one = [SearchRequest([vs_id], "", 10)]
        store.search_vectors(one, queries[:1])  # warm up
        raw_index = store.indexes.get(vs_id).index  # baseline: the bare FAISS call, same queries
        single, raw = [], []
        for i in range(repeats):  # interleaved, so load changes hit both alike
            single.append(timed(store.search_vectors, one, queries[i : i + 1]))
            raw.append(timed(raw_index.search, queries[i : i + 1], 10))
        recall = _recall_at_10(store, vs_id, data, queries[:50], index_kind)

        texts = [QUESTIONS[i % len(QUESTIONS)] for i in range(repeats)]
        end_to_end = [timed(store.search, [vs_id], texts[i], 10) for i in range(min(repeats, 100))]

        batch = [
            SearchRequest([vs_id], QUESTIONS[i % len(QUESTIONS)], 10) for i in range(CONCURRENCY)
        ]
        batched = [timed(store.search_many, batch) for _ in range(max(5, repeats // 20))]
        threaded = _threaded_latencies(store, vs_id, rounds=max(3, repeats // 40))
        store.close()
    return {
        "chunks": n_chunks,
        "index": index_kind,
        "build_s": round(build_s, 2),
        "reload_s": round(reload_s, 2),
        "recall_at_10_vs_exact": recall,
        "single_p50_ms": round(percentile(single, 50), 2),
        "single_p99_ms": round(percentile(single, 99), 2),
        "faiss_alone_p50_ms": round(percentile(raw, 50), 2),
        "store_over_faiss_p50": round(percentile(single, 50) / percentile(raw, 50), 3),
        "single_with_embedding_p50_ms": round(percentile(end_to_end, 50), 2),
        "single_with_embedding_p99_ms": round(percentile(end_to_end, 99), 2),
        "concurrent32_batched_p50_ms": round(percentile(batched, 50), 2),
        "concurrent32_batched_p99_ms": round(percentile(batched, 99), 2),
        "concurrent32_threads_p50_ms": round(percentile(threaded, 50), 2),
        "concurrent32_threads_p99_ms": round(percentile(threaded, 99), 2),
        "batched_over_threads_p50": round(percentile(batched, 50) / percentile(threaded, 50), 3),
    }


def _recall_at_10(store, vs_id, data, queries, index_kind) -> float:
    """Share of the exact top 10 that the index returns (1.0 for flat by construction).

    Chunk row ids of a fresh store run 1..n in insertion order, so id - 1 indexes `data`.
    """
    exact = np.argsort(-(queries @ data.T), axis=1)[:, :10]
    requests = [SearchRequest([vs_id], "", 10)] * len(queries)
    got = store.search_vectors(requests, queries)
    hits = sum(
        len({int(h.chunk_id.split("_")[1]) - 1 for h in found} & set(row.tolist()))
        for found, row in zip(got, exact, strict=True)
    )
    return round(hits / exact.size, 4)


def _threaded_latencies(store, vs_id, rounds: int) -> list[float]:
    """32 threads each calling search() at once, `rounds` times: the unbatched baseline."""
    latencies: list[float] = []
    lock = threading.Lock()

    def one(i: int, barrier: threading.Barrier) -> None:
        barrier.wait()
        ms = timed(store.search, [vs_id], QUESTIONS[i % len(QUESTIONS)], 10)
        with lock:
            latencies.append(ms)

    for _ in range(rounds):
        barrier = threading.Barrier(CONCURRENCY)
        threads = [threading.Thread(target=one, args=(i, barrier)) for i in range(CONCURRENCY)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    return latencies


def print_table(results: dict) -> None:
    ing = results["ingest"]
    print(
        f"\ningest (real embeddings, auto chunks): {ing['chunks']} chunks in {ing['seconds']} s"
        f" = {ing['chunks_per_s']} chunks/s; embedder alone {ing['embedder_alone_chunks_per_s']}"
        f" chunks/s (ratio {ing['pipeline_over_embedder']})"
    )
    cols = [
        ("chunks", "chunks"),
        ("index", "index"),
        ("build_s", "build s"),
        ("reload_s", "reload s"),
        ("recall_at_10_vs_exact", "R@10"),
        ("single_p50_ms", "1q p50"),
        ("single_p99_ms", "1q p99"),
        ("faiss_alone_p50_ms", "faiss p50"),
        ("store_over_faiss_p50", "1q/faiss"),
        ("single_with_embedding_p50_ms", "1q+emb p50"),
        ("single_with_embedding_p99_ms", "1q+emb p99"),
        ("concurrent32_batched_p50_ms", "32 batch p50"),
        ("concurrent32_batched_p99_ms", "32 batch p99"),
        ("concurrent32_threads_p50_ms", "32 thr p50"),
        ("concurrent32_threads_p99_ms", "32 thr p99"),
        ("batched_over_threads_p50", "batch/thr"),
    ]
    print("search latency in ms (1q = one query in-process, query vector given)")
    print(" | ".join(h for _, h in cols))
    for row in results["search"]:
        print(" | ".join(str(row[k]) for k, _ in cols))
    target = results["target"]
    print(
        f"target: 100k chunks, one query, p50 <= {target['p50_ms']} ms: flat (exact, default) "
        f"{target['measured_p50_ms']} ms -> {'met' if target['met'] else 'NOT met'}; "
        f"hnsw {target['hnsw_p50_ms']} ms; load average {results['machine']['load_avg_1m_at_start']}"
        f" at start on {results['machine']['cpu_count']} cores"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--indexes", nargs="+", default=["flat", "hnsw"])
    parser.add_argument("--ingest-chunks", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=200, help="single-query searches per row")
    parser.add_argument("--threads", type=int, default=1, help="torch and FAISS threads")
    parser.add_argument("--out", default=str(ROOT / "bench/results/retrieval.json"))
    args = parser.parse_args()

    import faiss
    import torch

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    embedder = shared_embedder()
    embedder.embed(["warm up"])

    results: dict = {
        "machine": {
            "cpu_count": os.cpu_count(),
            "load_avg_1m_at_start": round(os.getloadavg()[0], 2),
            "threads": args.threads,
            "python": platform.python_version(),
            "faiss": faiss.__version__,
            "torch": torch.__version__,
        },
        "ingest": bench_ingest(embedder, args.ingest_chunks),
        "search": [],
    }
    for n in args.sizes:
        for kind in args.indexes:
            row = bench_search(embedder, n, kind, args.repeats)
            results["search"].append(row)
            print(json.dumps(row), flush=True)
    flat_100k = [r for r in results["search"] if r["chunks"] == 100_000 and r["index"] == "flat"]
    measured = flat_100k[0]["single_p50_ms"] if flat_100k else None
    hnsw_100k = [r for r in results["search"] if r["chunks"] == 100_000 and r["index"] == "hnsw"]
    results["target"] = {
        "p50_ms": TARGET_P50_MS_100K,
        "hnsw_p50_ms": hnsw_100k[0]["single_p50_ms"] if hnsw_100k else None,
        "measured_p50_ms": measured,
        "met": measured is not None and measured <= TARGET_P50_MS_100K,
    }
    results["machine"]["load_avg_1m_at_end"] = round(os.getloadavg()[0], 2)
    print_table(results)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
