"""Retrieval-augmented answers through the product path, in-process (no Ray).

The toy world's questions are asked through the OpenAI serving layer over the torch engine on
builtin:toy, once with `rag` over the built-in `world` vector store and once without. Reports
answer accuracy (the first sentence names the answer), how often the relevant document was
among the retrieved sources, and the mean number of prompt tokens. Prints a table and writes
bench/results/rag_quality.json.

    .venv/bin/python bench/rag_quality.py [--top-k 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from models.builtin import resolve_source  # noqa: E402
from models.builtin.validate import answer_is_right  # noqa: E402
from models.builtin.world import world_documents, world_questions  # noqa: E402
from models.engine import build_engine  # noqa: E402
from models.engine.config import EngineConfig  # noqa: E402
from models.openai.serving import Backends, OpenAIServing, ServingLimits  # noqa: E402
from models.retrieval.service import RetrieverService  # noqa: E402


async def ask_all(serving: OpenAIServing, questions, rag: dict | None) -> list[dict]:
    async def one(q):
        body = {"model": "tandem", "temperature": 0, "max_tokens": 16,
                "messages": [{"role": "user", "content": q[0]}]}
        if rag:
            body["rag"] = rag
        r = await serving.chat(body)
        return {"text": r["choices"][0]["message"]["content"], "sources": r["tandem"]["sources"],
                "prompt_tokens": r["usage"]["prompt_tokens"]}

    return await asyncio.gather(*(one(q) for q in questions))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--source", default="builtin:toy")
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "rag_quality.json"))
    args = ap.parse_args()

    questions = world_questions()
    with tempfile.TemporaryDirectory() as data_dir:
        retriever = RetrieverService(
            {"data_dir": data_dir, "builtin_documents": True}, builtin_documents=world_documents
        )
        docs = {f["id"]: f["filename"] for f in retriever.list_files()["data"]}

        async def search(query, store_ids, top_k, threshold):
            request = retriever.search_request(query, store_ids, top_k, threshold or 0.0)
            return retriever.search_batch([request])[0]

        async def run():
            engine = build_engine(EngineConfig(kv_cache_cpu_gib=0.1), resolve_source(args.source).big)
            await engine.start()
            serving = OpenAIServing(
                model_name="tandem", tokenizer=engine.tokenizer,
                backends=Backends(generate=engine.generate, search=search),
                limits=ServingLimits(max_model_len=1024, vocab_size=len(engine.tokenizer)))
            with_rag = await ask_all(serving, questions, {"vector_store_ids": ["world"], "top_k": args.top_k})
            without = await ask_all(serving, questions, None)
            engine.shutdown()
            return with_rag, without

        with_rag, without = asyncio.run(run())

    def accuracy(rows):
        return sum(answer_is_right(q[1], r["text"]) for q, r in zip(questions, rows, strict=True)) / len(rows)

    def doc_hit(q, r):
        subject = q[2].lower()
        return any(subject in s["text"].lower() for s in r["sources"])

    result = {
        "source": args.source, "questions": len(questions), "top_k": args.top_k,
        "documents": len(docs),
        "accuracy_with_rag": round(accuracy(with_rag), 4),
        "accuracy_without_rag": round(accuracy(without), 4),
        "relevant_document_retrieved": round(sum(doc_hit(q, r) for q, r in zip(questions, with_rag, strict=True)) / len(questions), 4),
        "mean_prompt_tokens_with_rag": round(sum(r["prompt_tokens"] for r in with_rag) / len(with_rag), 1),
        "examples": [{"question": q[0], "answer": q[1], "with_rag": r["text"], "without_rag": w["text"]}
                     for q, r, w in list(zip(questions, with_rag, without, strict=True))[:5]],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'figure':<36} {'value':>8}")
    for key in ("questions", "accuracy_with_rag", "accuracy_without_rag", "relevant_document_retrieved",
                "mean_prompt_tokens_with_rag"):
        print(f"{key:<36} {result[key]:>8}")


if __name__ == "__main__":
    main()
