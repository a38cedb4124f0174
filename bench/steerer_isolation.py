"""What a slow or dead Steerer costs the rows that do not wait for it, in-process, same run.

Four plain greedy rows share the engine with one `sync` steered row whose Steerer answers
after --delay seconds (slow) or never (dead: each call times out after --timeout seconds).
Baseline: the four plain rows alone. For each case: the plain rows' largest and median gap
between two tokens and their wall time, and the sync row's time per token. The Steerer is a
stand-in that sleeps (what is measured is the engine's waiting, not a policy). Prints a table,
writes bench/results/steerer_isolation.json.

    PYTHONPATH=. python bench/steerer_isolation.py [--delay 0.2] [--timeout 0.3] [--tokens 32]

(PYTHONPATH=.: the checkout's models/ is the one measured, not an installed copy.)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from models.engine.config import EngineConfig
from models.engine.llm_engine import LLMEngine
from models.engine.tiny_checkpoint import build_tiny_checkpoint
from models.protocol.requests import GenerationRequest, SamplingParams
from models.protocol.steering import RowActions, SteeringRequest, StepObserver

RESULTS = Path(__file__).parent / "results" / "steerer_isolation.json"


class SleepySteerer(StepObserver):
    """Answers every row with no action after `delay` seconds."""

    def __init__(self, delay: float):
        self.delay = delay

    async def on_step(self, rows):
        await asyncio.sleep(self.delay)
        return [RowActions(r.request_id) for r in rows]


def run_case(ckpt: Path, args, delay: float | None) -> dict:
    eng = LLMEngine(EngineConfig(num_kv_blocks=256, block_size=8), ckpt)
    eng.set_step_observer(SleepySteerer(delay or 0.0))
    params = SamplingParams(max_tokens=args.tokens, temperature=0, ignore_eos=True)
    for i in range(4):
        eng.add_request(GenerationRequest(f"plain{i}", [10 + i, 20, 30], params))
    if delay is not None:
        eng.add_request(GenerationRequest(
            "sync", [5, 6, 7], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True),
            steering=SteeringRequest("p", mode="sync", timeout_s=args.timeout)))
    start = time.perf_counter()
    seen: dict[str, list[float]] = {}
    while eng.has_unfinished():
        for out in eng.step():
            if out.token_ids:
                seen.setdefault(out.request_id, []).append(time.perf_counter() - start)
    plain = [t for rid, t in seen.items() if rid.startswith("plain")]
    gaps = [b - a for t in plain for a, b in zip(t, t[1:], strict=False)]
    plain_end = max(t[-1] for t in plain)
    row = {"plain_max_gap_ms": 1000 * max(gaps), "plain_median_gap_ms": 1000 * statistics.median(gaps),
           "plain_wall_s": plain_end}  # fmt: skip
    if delay is not None:
        row["sync_s_per_token"] = seen["sync"][-1] / len(seen["sync"])
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--delay", type=float, default=0.2)
    parser.add_argument("--timeout", type=float, default=0.3)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a shared CPU)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = build_tiny_checkpoint(Path(tmp), "qwen3", seed=0)
        run_case(ckpt, args, None)  # warm-up: first-use costs out of the figures
        cases = {"plain only (baseline)": None, f"slow Steerer ({args.delay} s)": args.delay,
                 f"dead Steerer (times out at {args.timeout} s)": 60.0}  # fmt: skip
        results = {name: run_case(ckpt, args, delay) for name, delay in cases.items()}
    print(f"{'case':<36} {'plain max gap ms':>17} {'median ms':>10} {'plain wall s':>13} "
          f"{'sync s/token':>13}")  # fmt: skip
    for name, r in results.items():
        sync = f"{r['sync_s_per_token']:.3f}" if "sync_s_per_token" in r else "-"
        print(f"{name:<36} {r['plain_max_gap_ms']:>17.1f} {r['plain_median_gap_ms']:>10.1f} "
              f"{r['plain_wall_s']:>13.3f} {sync:>13}")  # fmt: skip
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"args": vars(args), "results": results}, indent=2))


if __name__ == "__main__":
    main()
