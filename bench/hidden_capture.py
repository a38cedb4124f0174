"""What capturing the residual stream costs a decode step (Qwen3-1.7B shape, one GPU).

Two measurements, same run, alternated so clock drift hits both alike:

- graph: the engine's decode step in a CUDA graph at batch 32, without and with the copy of 4
  layers' residual stream for every row (`LayerCapture`, as `DecodeGraphs` captures it);
- engine: `LLMEngine.step()` with 32 running requests, none of which reads hidden states vs
  all 32 asking for the same 4 layers (the graph above plus the per-step clone and the rows'
  views: everything a step adds when rows ask).

Target: capture adds <= 3 % to the step. Prints a table, writes JSON.

    PYTHONUNBUFFERED=1 python3 bench/hidden_capture.py --out $OUT     # GPU
    python bench/hidden_capture.py --device cpu --tiny                # logic check on CPU
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from engine_gpu import (  # noqa: E402
    SHAPES,
    DecodeBench,
    build_checkpoint,
    log,
    make_runner,
    synchronize,
    time_ms,
)

from models.engine.attention import ForwardBatch  # noqa: E402
from models.engine.config import EngineConfig  # noqa: E402
from models.engine.cuda_graph import CudaGraphRunner  # noqa: E402
from models.engine.hidden_capture import LayerCapture  # noqa: E402
from models.engine.llm_engine import LLMEngine  # noqa: E402
from models.protocol.requests import GenerationRequest, SamplingParams  # noqa: E402

TARGET_PCT = 3.0


def capture_graph(bench: DecodeBench, batch: int, layers: tuple[int, ...]) -> CudaGraphRunner:
    """The bench's decode step (advance included) copying `layers` into a static buffer."""
    a = bench.model.args
    hidden = torch.zeros(len(layers), batch, a.hidden_size, device=bench.device,
                         dtype=bench.runner.dtype)  # fmt: skip

    def step(views):
        fb = ForwardBatch(
            is_decode=True, slot_mapping=views["slots"], block_tables=views["tables"],
            context_lens=views["ctx"], query_lens=[], token_rows=views["rows"],
        )  # fmt: skip
        logits = bench.runner.decode(views["ids"], views["pos"], fb,
                                     LayerCapture(layers, views["hidden"]))  # fmt: skip
        views["ids"].copy_(logits.argmax(-1))
        bench.advance(views)
        return logits

    names = ["ids", "pos", "slots", "tables", "ctx", "rows"]
    buffers = {n: bench.buffers[n] for n in names}
    graph = CudaGraphRunner(step, dict(buffers, hidden=hidden), [batch], {"hidden": 1})
    if bench.device.type == "cuda":
        graph.capture()
    return graph


def bench_graph(path, device, shape, args, layers, results: dict) -> None:
    batch = args.batch
    max_len = args.prompt_len + args.rounds * args.steps * 2 + 64
    runner = make_runner(path, device, batch, max_len)
    bench = DecodeBench(runner, batch, max_len)
    plain = bench.graph([batch])
    captured = capture_graph(bench, batch, layers)
    gen = torch.Generator().manual_seed(1)
    prompts = torch.randint(2, shape["vocab_size"], (batch, args.prompt_len), generator=gen)
    bench.prefill(prompts.tolist())
    plain_ms, capture_ms = [], []
    for _ in range(args.rounds):  # the positions move on: both see the same context lengths
        plain_ms.append(time_ms(lambda: bench.replay(plain, batch), device, args.steps))
        capture_ms.append(time_ms(lambda: bench.replay(captured, batch), device, args.steps))
    results["graph_plain_ms"] = statistics.median(plain_ms)
    results["graph_capture_ms"] = statistics.median(capture_ms)
    results["graph_overhead_pct"] = 100 * (results["graph_capture_ms"] / results["graph_plain_ms"] - 1)
    log(f"graph bs {batch}: {results['graph_capture_ms']:.3f} ms with capture of {len(layers)} "
        f"layers vs {results['graph_plain_ms']:.3f} ms")  # fmt: skip


def bench_engine(path, device, shape, args, layers, results: dict) -> None:
    batch, steps = args.batch, args.steps
    new_tokens = args.rounds * 2 * (steps + 2) + 8
    max_len = args.prompt_len + new_tokens + 16
    config = EngineConfig(device=device.type, max_num_seqs=batch, max_model_len=max_len,
                          num_kv_blocks=1 + batch * (max_len // 16 + 2),
                          cuda_graph_batch_sizes=[batch], hidden_capture_layers=list(layers))  # fmt: skip
    eng = LLMEngine(config, path, tokenizer=None)
    gen = torch.Generator().manual_seed(2)
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    prompts = torch.randint(2, shape["vocab_size"], (batch, args.prompt_len), generator=gen)
    for i, prompt in enumerate(prompts.tolist()):
        eng.add_request(GenerationRequest(str(i), prompt, params))
    while any(s.num_computed < s.num_prompt_tokens for s in eng.seqs.values()):
        eng.step()

    def timed(asking: bool) -> float:
        for seq in eng.seqs.values():
            seq.hidden_layers = layers if asking else ()
        for _ in range(2):
            eng.step()
        synchronize(device)
        t = time.perf_counter()
        for _ in range(steps):
            eng.step()
        synchronize(device)
        return (time.perf_counter() - t) * 1000 / steps

    plain_ms, capture_ms = [], []
    for _ in range(args.rounds):
        plain_ms.append(timed(False))
        capture_ms.append(timed(True))
    seq = next(iter(eng.seqs.values()))
    assert seq.hidden is not None and seq.hidden.shape == (len(layers), shape["hidden_size"])
    results["engine_plain_ms"] = statistics.median(plain_ms)
    results["engine_capture_ms"] = statistics.median(capture_ms)
    results["engine_overhead_pct"] = 100 * (results["engine_capture_ms"] / results["engine_plain_ms"] - 1)
    log(f"LLMEngine.step bs {batch}: {results['engine_capture_ms']:.3f} ms with every row "
        f"reading {len(layers)} layers vs {results['engine_plain_ms']:.3f} ms")  # fmt: skip


def table(results: dict) -> str:
    rows = [("decode step in a CUDA graph", "graph"), ("LLMEngine.step (host work included)", "engine")]
    lines = [f"Residual-stream capture, {len(results['layers'])} layers {results['layers']}, every row "
             f"of batch {results['batch']}, {results['device']}",
             "| measurement | without (ms) | with capture (ms) | added | target |",
             "|---|---|---|---|---|"]  # fmt: skip
    for label, key in rows:
        if f"{key}_plain_ms" in results:
            lines.append(
                f"| {label} | {results[f'{key}_plain_ms']:.3f} | {results[f'{key}_capture_ms']:.3f} "
                f"| {results[f'{key}_overhead_pct']:+.1f} % | <= {TARGET_PCT:.0f} % |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny model shape (CPU logic check)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=50, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--checkpoint", default="/tmp/tandem-bench-qwen3")
    parser.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    args = parser.parse_args()
    device = torch.device(args.device)
    shape = SHAPES["tiny" if args.tiny else "qwen3-1.7b"]
    if args.tiny:
        args.batch, args.prompt_len, args.steps, args.rounds = 4, 16, 3, 2
    n = shape["num_hidden_layers"]
    layers = tuple(sorted({n // 4, n // 2, 3 * n // 4, n - 1})) if n >= 4 else tuple(range(n))
    results: dict = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                     "torch": torch.__version__, "shape": shape, "batch": args.batch,
                     "prompt_len": args.prompt_len, "layers": list(layers),
                     "target_pct": TARGET_PCT}  # fmt: skip
    path = Path(args.checkpoint + ("-tiny" if args.tiny else ""))
    build_checkpoint(path, shape, device)
    bench_graph(path, device, shape, args, layers, results)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    bench_engine(path, device, shape, args, layers, results)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "hidden_capture_tiny_cpu.json" if args.tiny else "hidden_capture.json"
    (out / name).write_text(json.dumps(results, indent=1))
    print()
    print(table(results))
    print(f"\nJSON: {out / name}")


if __name__ == "__main__":
    main()
