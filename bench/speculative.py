"""Speculative decoding: the small model drafts, the big model verifies k + 1 tokens per step.

CPU (default): the built-in toy pair (big drafts by small), greedy, toy-world story openings:
acceptance per k and single-stream tokens/s with vs without speculation, same run. Both toy
models are launch-bound on a CPU, so the drafter costs nearly what the big model does: a
report, no target. Writes bench/results/speculative_cpu.json.

GPU (--gpu): random bf16 weights, Qwen3-8B shape big model (about 16 GB) and the Qwen3-0.6B
shape drafter (and the 1.7B / 0.6B pair): the cost of one verify step of k + 1 tokens against
one decode step (batch 1; target <= 1.3x at k = 4), and single-stream tokens/s with
speculation where the drafter's proposals are replaced by the big model's own next tokens, each
kept with probability `--acceptance` until the first miss (default: the toy pair's per-token
acceptance at k = 4, read from speculative_cpu.json). A labelled simulation (random weights agree on nothing): the drafter
still runs for its cost, only its tokens are replaced. Target >= 1.5x over plain decode.

    python bench/speculative.py                                    # CPU, toy pair
    PYTHONUNBUFFERED=1 python3 bench/speculative.py --gpu --out $OUT   # speculative_gpu.json
    python bench/speculative.py --gpu --tiny --out /tmp            # the GPU mode's logic on a CPU
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.engine.config import EngineConfig  # noqa: E402
from models.engine.llm_engine import LLMEngine  # noqa: E402
from models.protocol.drafter import Draft  # noqa: E402
from models.protocol.requests import GenerationRequest, SamplingParams  # noqa: E402
from models.steering.drafter import SmallModelDrafter  # noqa: E402
from models.steering.paged_small_model import PagedSmallModel  # noqa: E402

RESULTS = Path(__file__).parent / "results"
SHAPES = {
    "qwen3-8b": dict(hidden_size=4096, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, intermediate_size=12288,
                     vocab_size=151936),
    "qwen3-0.6b": dict(hidden_size=1024, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, intermediate_size=3072,
                       vocab_size=151936),
}  # fmt: skip
TARGETS = {"verify_over_decode_k4": 1.3, "simulated_speedup": 1.5}


def generate(eng: LLMEngine, prompts: list[list[int]], max_tokens: int) -> tuple[float, list]:
    """Greedy, one request at a time (single stream); tokens/s and the tokens."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    start, out = time.perf_counter(), []
    for i, prompt in enumerate(prompts):
        eng.add_request(GenerationRequest(f"r{i}-{time.perf_counter_ns()}", prompt, params))
        tokens = []
        while eng.has_unfinished():
            for o in eng.step():
                tokens += o.token_ids
        out.append(tokens)
    return sum(map(len, out)) / (time.perf_counter() - start), out


def toy_prompts(tokenizer, n: int) -> list[list[int]]:
    from models.builtin.world import story

    rng = random.Random(0)
    return [tokenizer(" ".join(story(rng, rng.random() < 0.5)[:2])).input_ids for _ in range(n)]


def bench_cpu(args) -> dict:
    from models.builtin import TOY_DIR

    torch.set_num_threads(args.threads)
    big = LLMEngine(EngineConfig(device="cpu", num_kv_blocks=512), TOY_DIR / "big")
    small = PagedSmallModel(str(TOY_DIR / "small"), device="cpu", kv_cache_gib=0.05)
    prompts = toy_prompts(big.tokenizer, args.prompts)
    generate(big, prompts[:1], 8)  # warm-up
    base_tok_s, base_tokens = generate(big, prompts, args.max_tokens)
    rows = [{"k": 0, "tok_s": round(base_tok_s, 1), "acceptance": None, "speedup": 1.0}]
    for k in args.ks:
        big.config.speculative.k = k
        big.set_drafter(SmallModelDrafter(small))
        tok_s, tokens = generate(big, prompts, args.max_tokens)
        spec = big.speculator
        rows.append({
            "k": k, "tok_s": round(tok_s, 1),
            "acceptance": round(spec.num_accepted / max(spec.num_proposed, 1), 3),
            # per token, until the first miss: the geometric chain's estimate
            "token_acceptance": round(
                spec.num_accepted / max(spec.num_accepted + spec.num_rejections, 1), 3
            ),
            "tokens_per_verify": round(
                (spec.num_accepted + spec.num_verified) / max(spec.num_verified, 1), 2
            ),
            "speedup": round(tok_s / base_tok_s, 2), "same_tokens": tokens == base_tokens,
        })  # fmt: skip
        big.set_drafter(None)
    print(f"toy pair, CPU, {args.threads} thread(s), greedy, {args.prompts} prompts x "
          f"{args.max_tokens} tokens, single stream")  # fmt: skip
    print(f"{'k':>3}{'tok/s':>9}{'accepted':>10}{'per token':>11}{'tok/verify':>12}"
          f"{'speedup':>9}{'same text':>11}")  # fmt: skip
    for r in rows:
        print(f"{r['k']:>3}{r['tok_s']:>9}{r['acceptance'] or '-':>10}"
              f"{r.get('token_acceptance', '-'):>11}{r.get('tokens_per_verify', '-'):>12}"
              f"{r['speedup']:>9}{str(r.get('same_tokens', '-')):>11}")  # fmt: skip
    return {"model": "built-in toy pair (big drafted by small), float32, CPU", "rows": rows,
            "max_tokens": args.max_tokens, "prompts": args.prompts, "threads": args.threads}  # fmt: skip


class OracleDrafter:
    """Simulation (labelled): runs the real drafter for its cost, then proposes the big
    model's own greedy continuation (known from a plain run), each token kept with
    probability `acceptance` until the first miss (a miss proposes another token)."""

    def __init__(self, real: SmallModelDrafter, reference: list[int], prompt_len: int, acc: float):
        self.real, self.reference, self.prompt_len, self.acc = real, reference, prompt_len, acc
        self.vocab_size = real.vocab_size
        self.rng = random.Random(0)

    def propose(self, rows, k):
        self.real.propose(rows, k)
        out = []
        for row in rows:
            at = len(row.token_ids) - self.prompt_len
            truth = self.reference[at : at + k]
            tokens, hit = [], True
            for t in truth:
                hit = hit and self.rng.random() < self.acc
                tokens.append(t if hit else (t + 1) % self.vocab_size)
            out.append(Draft(tokens))
        return out

    def release(self, request_ids):
        self.real.release(request_ids)


def cuda_ms(fn, iters: int = 20) -> float:
    fn()
    times = []
    for _ in range(iters):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def step_costs(eng: LLMEngine, context: int, ks: list[int]) -> dict[int, float]:
    """ms of one engine forward over one row with `context` cached tokens, adding 1 (decode,
    CUDA graph) or k + 1 tokens (verify) — the runner alone, as the engine calls it."""
    from models.engine.scheduler import ScheduledSequence

    params = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)
    eng.add_request(GenerationRequest("ctx", list(range(3, 3 + context)), params))
    eng.step()  # prefill
    seq = eng.seqs["ctx"]
    out = {}
    for k in [0, *ks]:
        seq.token_ids += [5] * k
        eng.blocks.grow(seq, len(seq.token_ids))
        item = [ScheduledSequence(seq, k + 1)]
        counts = None if k == 0 else [k + 1]
        out[k] = cuda_ms(lambda item=item, counts=counts: eng.runner.run(item, None, None, counts))
        del seq.token_ids[len(seq.token_ids) - k :]
    eng.abort("ctx")
    eng.step()
    return out


def bench_gpu(args) -> dict:
    from bench.engine_gpu import SHAPES as GPU_SHAPES
    from bench.engine_gpu import build_checkpoint

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tiny = GPU_SHAPES["tiny"]
    pairs = [("qwen3-8b", "qwen3-0.6b"), ("qwen3-1.7b", "qwen3-0.6b")]
    shapes = {**SHAPES, "qwen3-1.7b": GPU_SHAPES["qwen3-1.7b"]}
    acc = args.acceptance
    if acc is None:
        cpu = json.loads((RESULTS / "speculative_cpu.json").read_text())
        acc = next(r["token_acceptance"] for r in cpu["rows"] if r["k"] == 4)
    results = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
               "acceptance_simulated": acc, "targets": TARGETS, "pairs": []}  # fmt: skip
    for big_name, small_name in pairs:
        paths = {}
        for name in (big_name, small_name):
            paths[name] = Path(f"{args.checkpoint}-{name}" + ("-tiny" if args.tiny else ""))
            build_checkpoint(paths[name], tiny if args.tiny else shapes[name], device,
                             seed=len(paths))  # fmt: skip
        config = EngineConfig(num_kv_blocks=args.kv_blocks, max_adapters_per_replica=0,
                              max_num_seqs=8, device=device.type)  # fmt: skip
        big = LLMEngine(config, paths[big_name], tokenizer=None)
        small = PagedSmallModel(str(paths[small_name]), device=device.type, kv_cache_gib=1.0,
                                max_model_len=big.max_model_len)  # fmt: skip
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        costs = step_costs(big, args.context, [1, 2, 4, 6]) if device.type == "cuda" else {}
        prompt = list(range(3, 3 + args.context))
        generate(big, [prompt], 2)  # warm-up: the prefill kernels' JIT compile is not timed
        sync()
        base_tok_s, ref = generate(big, [prompt], args.max_tokens)
        sims = []
        for k in (2, 4, 6):
            big.config.speculative.k = k
            big.set_drafter(OracleDrafter(SmallModelDrafter(small), ref[0], len(prompt), acc))
            tok_s, got = generate(big, [prompt], args.max_tokens)
            big.set_drafter(None)
            sims.append({"k": k, "tok_s": round(tok_s, 1), "speedup": round(tok_s / base_tok_s, 2),
                         "same_tokens": got == ref})  # fmt: skip
        row = {"big": big_name, "drafter": small_name, "context": args.context,
               "decode_step_ms": round(costs.get(0, 0.0), 3),
               "verify_over_decode": {k: round(v / costs[0], 3) for k, v in costs.items() if k},
               "plain_tok_s": round(base_tok_s, 1), "simulated": sims}  # fmt: skip
        results["pairs"].append(row)
        print(f"\n{big_name} verified, {small_name} drafting ({results['device']}), context "
              f"{args.context}")  # fmt: skip
        if costs:
            print(
                f"decode step {costs[0]:.3f} ms; verify k+1 / decode: "
                + ", ".join(f"k={k}: {v:.2f}x" for k, v in row["verify_over_decode"].items())
            )
        print(
            f"plain {base_tok_s:.1f} tok/s; SIMULATED drafts at acceptance {acc}: "
            + ", ".join(f"k={s['k']}: {s['tok_s']} tok/s ({s['speedup']}x)" for s in sims)
        )
        del big, small
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--tiny", action="store_true", help="with --gpu: tiny shapes")
    parser.add_argument("--ks", default="1,2,4,6")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--context", type=int, default=512, help="GPU: prompt tokens")
    parser.add_argument("--kv-blocks", type=int, default=512, help="GPU: big model KV blocks")
    parser.add_argument("--acceptance", type=float, default=None, help="GPU simulation")
    parser.add_argument("--checkpoint", default="/tmp/tandem-bench-spec")
    parser.add_argument("--out", default=os.environ.get("OUT", str(RESULTS)))
    args = parser.parse_args()
    args.ks = [int(k) for k in args.ks.split(",")]
    results = bench_gpu(args) if args.gpu else bench_cpu(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    file = out / f"speculative_{'gpu' if args.gpu else 'cpu'}.json"
    file.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {file}")


if __name__ == "__main__":
    main()
