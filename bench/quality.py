"""What the toy models learned: fluency, copy-from-context, task adapters, steering, proxy tuning.

    python bench/quality.py [--source builtin:toy] [--n 64] [--device cuda]

Prints a table and writes bench/results/quality.json. Each row compares against a baseline
measured in the same run (no context, base model, coefficient 0, alpha 0).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.builtin import quality, world  # noqa: E402

STEER_COEFFS = [0.0, 0.5, 0.75, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0]
PROXY_ALPHAS = [0.0, 1.0, 2.0, 4.0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="builtin:toy")
    parser.add_argument("--n", type=int, default=64, help="Prompts per measure.")
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "quality.json")
    args = parser.parse_args()

    start = time.time()
    m = quality.load_toy(args.source, args.device)
    result = {
        "source": args.source,
        "device": str(m.device),
        "n": args.n,
        "fluency": quality.fluency(m, args.n),
        "context": quality.context_accuracy(m, args.n),
        "tasks": {t: quality.task_accuracy(m, t, args.n) for t in world.TASKS},
        "steering_vector": quality.steering_sweep(m, args.n, STEER_COEFFS),
        "steering_vector_one_layer": quality.steering_sweep(
            m, args.n, STEER_COEFFS, [m.big.config.num_hidden_layers // 2 - 1]
        ),
        "proxy_tuning": quality.proxy_sweep(m, args.n, PROXY_ALPHAS),
        "router_accuracy": None,
    }
    result["seconds"] = round(time.time() - start, 1)

    rows = [
        ("fluency: valid sentences (sampled, T=1)", f"{result['fluency']['valid']:.1%}", ""),
        ("context QA with passage / without", f"{result['context']['with_context']:.1%}",
         f"{result['context']['without_context']:.1%}"),
        ("context QA, held-out passages", f"{result['context']['held_out_passages']:.1%}", ""),
        ("  keyed by a person with a rival fact of that kind / others",
         f"{result['context']['held_out_with_rival']:.1%}",
         f"{result['context']['held_out_without_rival']:.1%}"),
    ]  # fmt: skip
    for t, r in result["tasks"].items():
        rows.append((f"task {t}: adapter / base", f"{r['adapter']:.1%}", f"{r['base']:.1%}"))
        if "adapter_with_rival" in r:
            rows.append(("  adapter on questions with a rival fact (not the task)",
                         f"{r['adapter_with_rival']:.1%}", ""))  # fmt: skip
    for key in ("steering_vector", "steering_vector_one_layer"):
        layers = result[key]["layers"]
        for c, r in result[key]["by_coeff"].items():
            name = f"steering layers {layers} coeff {c}: positive / valid"
            rows.append((name, f"{r['positive']:.1%}", f"{r['valid']:.1%}"))
    for a, r in result["proxy_tuning"]["by_alpha"].items():
        rows.append(
            (f"proxy alpha {a}: positive / valid", f"{r['positive']:.1%}", f"{r['valid']:.1%}")
        )
    width = max(len(r[0]) for r in rows)
    for name, a, b in rows:
        print(f"{name:<{width}}  {a:>7}  {b:>7}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out} in {result['seconds']} s")


if __name__ == "__main__":
    main()
