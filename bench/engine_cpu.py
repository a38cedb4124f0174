"""Torch engine vs transformers `generate` on a tiny random Qwen3, CPU, same run.

Throughput (generated tokens per second, prefill included) for one stream and for a batch of
16 concurrent requests, greedy, fixed length; each number is the best of --repeats runs,
alternating the two sides, because the shared CPU is noisy. Prints a table, writes
bench/results/engine_cpu.json.

Runs torch with --threads (default 1): on a CPU shared with other work, two OpenMP threads
spin-wait on each other and both sides slow down several times over, which measures the load.

    python bench/engine_cpu.py [--max-tokens 64] [--batch 16] [--repeats 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from models.engine.config import EngineConfig
from models.engine.llm_engine import LLMEngine
from models.engine.tiny_checkpoint import build_tiny_checkpoint
from models.protocol.requests import GenerationRequest, SamplingParams

RESULTS = Path(__file__).parent / "results" / "engine_cpu.json"


def prompts(batch: int, length: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 512, (length,), generator=g).tolist() for _ in range(batch)]


def engine_tokens_per_s(engine: LLMEngine, batch: list[list[int]], max_tokens: int) -> float:
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    start = time.perf_counter()
    for i, p in enumerate(batch):
        engine.add_request(GenerationRequest(f"r{time.perf_counter_ns()}-{i}", p, params))
    generated = 0
    while engine.has_unfinished():
        generated += sum(len(o.token_ids) for o in engine.step())
    return generated / (time.perf_counter() - start)


@torch.inference_mode()
def hf_tokens_per_s(model, batch: list[list[int]], max_tokens: int) -> float:
    ids = torch.tensor(batch)
    start = time.perf_counter()
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_tokens,
        min_new_tokens=max_tokens,
        do_sample=False,
    )
    return (out.shape[1] - ids.shape[1]) * len(batch) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = build_tiny_checkpoint(
            tmp, "qwen3", hidden_size=128, intermediate_size=384, num_hidden_layers=4
        )
        engine = LLMEngine(EngineConfig(num_kv_blocks=512, max_adapters_per_replica=0), ckpt)
        hf = AutoModelForCausalLM.from_pretrained(str(ckpt)).eval()
        engine_tokens_per_s(engine, prompts(2, 8), 4)  # warm-up
        hf_tokens_per_s(hf, prompts(2, 8), 4)
        rows = []
        for label, size in (("single stream", 1), (f"batch {args.batch}", args.batch)):
            batch = prompts(size, args.prompt_len)
            ours, theirs = 0.0, 0.0
            for _ in range(args.repeats):
                ours = max(ours, engine_tokens_per_s(engine, batch, args.max_tokens))
                theirs = max(theirs, hf_tokens_per_s(hf, batch, args.max_tokens))
            rows.append(
                {
                    "case": label,
                    "batch": size,
                    "engine_tok_s": round(ours, 1),
                    "transformers_tok_s": round(theirs, 1),
                    "ratio": round(ours / theirs, 2),
                }
            )
    print(f"{'case':<16}{'engine tok/s':>14}{'transformers tok/s':>20}{'ratio':>8}")
    for r in rows:
        print(f"{r['case']:<16}{r['engine_tok_s']:>14}{r['transformers_tok_s']:>20}{r['ratio']:>8}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "model": "random qwen3, hidden 128, 4 layers, vocab 512, float32, CPU",
        "max_tokens": args.max_tokens,
        "prompt_len": args.prompt_len,
        "repeats": args.repeats,
        "torch_threads": torch.get_num_threads(),
        "rows": rows,
    }
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
