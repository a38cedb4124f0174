"""The `probe` policy (a linear probe on the big model's residual stream) against `vector_guard`
(the small model reads the text) on the toy world's sentiment task, same run.

Both watch for gloom, are trained on the same labelled stories (60 gloomy, 60 sunny), and turn
on the same `positive` steering vector when they fire. Measured on held-out stories (50 gloomy,
50 sunny, other seeds):

- firing accuracy: the policy fires on a gloomy story and stays quiet on a sunny one, decided
  at the prompt (one generated token);
- continuations: share of positive continuations (24 tokens, temperature 0.7) of the gloomy
  stories, and their validity (quality.continuation_stats; coeff 0.75 on the middle layers keeps
  most of them grammatical, bench/results/quality.json);
- step time: a decode step with 16 rows steered by the policy (colocated) against none.

Target: probe firing accuracy >= 90 %. Prints a table, writes JSON.

    python bench/probe.py                      # CPU, a few minutes
    python bench/probe.py --device cuda        # GPU step times
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

from models.builtin import quality, resolve_source, world  # noqa: E402
from models.engine.config import EngineConfig  # noqa: E402
from models.engine.llm_engine import LLMEngine  # noqa: E402
from models.protocol.requests import GenerationRequest, SamplingParams  # noqa: E402
from models.protocol.steering import SteeringRequest  # noqa: E402
from models.steering.config import SteeringConfig  # noqa: E402
from models.steering.runtime import SteeringRuntime  # noqa: E402
from models.steering.vectors import (  # noqa: E402
    default_layers,
    extract_vector,
    load_transformers_model,
    transformers_hidden_states,
)

TARGET_ACCURACY = 0.9
PROBE_LAYERS = [1]
WINDOW = 16


def stories(seed: int, gloomy: bool, n: int) -> list[str]:
    """n story prompts of one mood (no drift: the mood holds to the end)."""
    rng = random.Random(seed)
    return [
        quality.chat_text("Continue the story: " + " ".join(
            world.story(rng, not gloomy, consistency=1.0, drift=False)))
        for _ in range(n)
    ]  # fmt: skip


def policies(gloomy: list[str], sunny: list[str], coeff: float) -> list[dict]:
    on = {"vector": "positive", "coeff": coeff, "positive": gloomy, "negative": sunny}
    return [
        {"name": "guard", "kind": "vector_guard",
         "params": dict(on, threshold=0.0, concept_layer=0, pool="mean", window=32)},
        {"name": "probe", "kind": "probe",
         "params": dict(on, hidden_layers=PROBE_LAYERS, hidden_prompt_positions=WINDOW,
                        window=WINDOW, threshold=0.5)},
    ]  # fmt: skip


def run(eng: LLMEngine, requests: list[GenerationRequest]) -> dict[str, tuple[list[int], bool]]:
    """request id -> (tokens, whether a SteerVector was applied)."""
    out = {r.request_id: ([], False) for r in requests}
    for r in requests:
        eng.add_request(r)
    while eng.has_unfinished():
        for o in eng.step():
            tokens, fired = out[o.request_id]
            if o.finish_reason == "error":
                raise RuntimeError(o.error)
            fired = fired or any(i.action == "SteerVector" for i in o.interventions)
            out[o.request_id] = (tokens + o.token_ids, fired)
    return out


def firing(eng, tok, policy: str, gloomy: list[str], sunny: list[str], params) -> dict:
    reqs = [
        GenerationRequest(f"{mood}{i}", tok(text).input_ids, SamplingParams(max_tokens=1),
                          steering=SteeringRequest(policy, params, mode="colocated"))
        for mood, texts in (("g", gloomy), ("s", sunny)) for i, text in enumerate(texts)
    ]  # fmt: skip
    got = run(eng, reqs)
    fired_g = sum(fired for rid, (_, fired) in got.items() if rid[0] == "g")
    fired_s = sum(fired for rid, (_, fired) in got.items() if rid[0] == "s")
    n = len(gloomy) + len(sunny)
    return {"accuracy": (fired_g + len(sunny) - fired_s) / n,
            "fired_gloomy": fired_g / len(gloomy), "fired_sunny": fired_s / len(sunny)}  # fmt: skip


def continuations(eng, tok, policy: str | None, gloomy: list[str], params) -> dict:
    reqs = [
        GenerationRequest(f"c{i}", tok(text).input_ids,
                          SamplingParams(max_tokens=24, temperature=0.7, seed=i),
                          steering=None if policy is None
                          else SteeringRequest(policy, params, mode="colocated"))
        for i, text in enumerate(gloomy)
    ]  # fmt: skip
    texts = [tok.decode(t, skip_special_tokens=True) for t, _ in run(eng, reqs).values()]
    return quality.continuation_stats(texts)


def step_ms(eng, tok, policy: str | None, prompts: list[str], params, device, tokens=32) -> float:
    """Milliseconds per decode step with len(prompts) rows steered by `policy` (None: none)."""
    sampling = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    for i, text in enumerate(prompts):
        eng.add_request(GenerationRequest(
            f"t{i}", tok(text).input_ids, sampling,
            steering=None if policy is None else SteeringRequest(policy, params, mode="colocated"),
        ))  # fmt: skip
    for _ in range(3):  # the prefill and a warm-up
        eng.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t, steps = time.perf_counter(), 0
    while eng.has_unfinished():
        eng.step()
        steps += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) * 1000 / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--coeff", type=float, default=0.75)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    args = parser.parse_args()
    device = torch.device(args.device)
    toy = resolve_source("builtin:toy")
    model, tok = load_transformers_model(toy.big)
    pairs = world.steering_pairs(16)
    chat = [(quality.chat_text(f"Continue the story: {p}"), quality.chat_text(f"Continue the story: {n}"))
            for p, n in pairs]  # fmt: skip
    vector = extract_vector(
        "positive", transformers_hidden_states(model, tok, pool="mean"),
        [p for p, _ in chat], [n for _, n in chat], layers=default_layers(model.config.num_hidden_layers),
    )  # fmt: skip
    train_g, train_s = stories(11, True, 60), stories(12, False, 60)
    held_g, held_s = stories(99, True, 50), stories(98, False, 50)
    specs = policies(train_g, train_s, args.coeff)
    config = SteeringConfig.model_validate({"policies": specs, "device": args.device})
    edge = {spec["name"]: spec["params"] for spec in specs}  # what the Ingress sends along
    t = time.perf_counter()
    runtime = SteeringRuntime.from_source(config, "builtin:toy")
    start_s = time.perf_counter() - t
    engine_config = EngineConfig(device=args.device, dtype="float32", num_kv_blocks=1024,
                                 block_size=16, hidden_capture_layers=PROBE_LAYERS)  # fmt: skip
    eng = LLMEngine(engine_config, toy.big)
    eng.register_vector("positive", vector.as_tensor(eng.args.num_layers))
    eng.set_step_observer(runtime)
    results: dict = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                     "probe_layers": PROBE_LAYERS, "window": WINDOW, "coeff": args.coeff,
                     "train": {"gloomy": len(train_g), "sunny": len(train_s)},
                     "held_out": {"gloomy": len(held_g), "sunny": len(held_s)},
                     "runtime_start_s": start_s, "target_accuracy": TARGET_ACCURACY,
                     "policies": {}}  # fmt: skip
    for name in ("guard", "probe"):
        results["policies"][name] = {
            "firing": firing(eng, tok, name, held_g, held_s, edge[name]),
            "continuations": continuations(eng, tok, name, held_g, edge[name]),
        }
        print(name, results["policies"][name], flush=True)
    results["policies"]["none"] = {"continuations": continuations(eng, tok, None, held_g, {})}
    timed: dict[str, list[float]] = {"none": [], "guard": [], "probe": []}
    for _ in range(args.rounds):
        for name in timed:
            policy = None if name == "none" else name
            timed[name].append(step_ms(eng, tok, policy, held_g[:16], edge.get(name), device))
    for name, values in timed.items():
        results["policies"][name]["step_ms"] = statistics.median(values)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / ("probe.json" if device.type == "cpu" else "probe_gpu.json")
    path.write_text(json.dumps(results, indent=1))
    print()
    print(table(results))
    print(f"\nJSON: {path}")


def table(results: dict) -> str:
    base = results["policies"]["none"]["step_ms"]
    lines = [
        f"Probe (big-model layers {results['probe_layers']}, window {results['window']}) vs "
        f"vector guard (small model), toy sentiment task, {results['device']}; held out "
        f"{results['held_out']['gloomy']} gloomy + {results['held_out']['sunny']} sunny stories",
        "| policy | firing accuracy | fired on gloomy | fired on sunny | gloomy continuations "
        "positive | valid | step, 16 rows (ms) | added step time |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in ("none", "guard", "probe"):
        r = results["policies"][name]
        f = r.get("firing")
        acc = f"{f['accuracy']:.0%} | {f['fired_gloomy']:.0%} | {f['fired_sunny']:.0%}" if f else "— | — | —"
        c = r["continuations"]
        added = "—" if name == "none" else f"{100 * (r['step_ms'] / base - 1):+.0f} %"
        lines.append(f"| {name} | {acc} | {c['positive']:.0%} | {c['valid']:.0%} | "
                     f"{r['step_ms']:.2f} | {added} |")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    main()
