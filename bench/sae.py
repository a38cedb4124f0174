"""The toy model's sparse autoencoder: reconstruction, named features, and steering with a
feature against the extracted steering vector (CPU, a few minutes).

- reconstruction: fraction of variance explained (FVE) of the states at the SAE's layer on
  held-out toy-world texts, and the share of the baseline (mean) error left;
- named features: per concept the feature models/builtin/sae_features.py named (sae.json),
  its precision and recall over tokens of held-out texts (fresh seeds, not those it was named
  on);
- steering: gloomy story openings continued (48 tokens, temperature 0.7) unsteered, with the
  default config's extracted `positive` vector (what the app serves: mean of differences of
  its 12 pairs, middle layers) and with the mood features' decoder directions (`sae:sunny`
  added, `sae:gloomy` subtracted; scaled to their typical activation, at the SAE's layer
  only): share of positive and of grammatical continuations (models/builtin/quality.py's
  checker).

    nice python bench/sae.py            # prints the table, writes bench/results/sae.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models.builtin import TOY_DIR, quality  # noqa: E402
from models.builtin.sae import fve, layer_states  # noqa: E402
from models.builtin.sae_features import eval_texts, mood_texts, name_features  # noqa: E402
from models.steering.policies.probe import block_outputs  # noqa: E402
from models.steering.sae import load_sae  # noqa: E402
from models.steering.vectors import extract_vector, transformers_hidden_states  # noqa: E402


def served_vector(m) -> dict:
    """The default config's `positive` vector, extracted as the app extracts it."""
    import yaml

    from models.steering.config import VectorConfig

    cfg = yaml.safe_load(Path("serve_config.yaml").read_text())
    spec = VectorConfig.model_validate(cfg["applications"][0]["args"]["steering"]["vectors"][0])
    v = extract_vector(spec.name, transformers_hidden_states(m.big, m.tok, pool=spec.pool),
                       spec.positive, spec.negative, layers=spec.layers, method=spec.method)  # fmt: skip
    return v.directions


def steering_rows(m, sae, prompts: list[str], vec_coeffs, sae_coeffs) -> list[dict]:
    vector = served_vector(m)
    rows = [{"steering": "none", "coeff": 0.0}]
    rows += [{"steering": "extracted vector `positive`", "coeff": c, "v": vector} for c in vec_coeffs]
    for name, sign in (("sunny", 1), ("gloomy", -1)):
        feature = {sae.layer: sae.direction(sae.names[name]).to(m.device)}
        rows += [{"steering": f"SAE feature `sae:{name}`", "coeff": sign * c, "v": feature}
                 for c in sae_coeffs]  # fmt: skip
    for row in rows:
        with quality.steered(m.big, row.pop("v", {}), row["coeff"]):
            texts = quality.generate(m, m.big, prompts, temperature=0.7, seed=7)
        row.update(quality.continuation_stats(texts))
        print(f"{row['steering']} x {row['coeff']}: {row}", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=48)
    ap.add_argument("--texts", type=int, default=400)
    ap.add_argument("--vector-coeffs", type=float, nargs="+", default=[0.5, 1.0, 2.0])
    ap.add_argument("--sae-coeffs", type=float, nargs="+", default=[2.0, 4.0, 8.0])
    ap.add_argument("--out", default="bench/results/sae.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    started = time.monotonic()
    sae = load_sae(TOY_DIR / "sae")
    m = quality.load_toy(device="cpu")
    held = layer_states(m.big, m.tok, eval_texts(9001, args.texts), sae.layer)
    m.tok.padding_side = "right"
    later = torch.cat([h[1:] for h in block_outputs(m.big, m.tok, eval_texts(9001, args.texts),
                                                    [sae.layer])])  # fmt: skip
    recon = {"fve_held_out": round(fve(sae, held), 4), "tokens": held.shape[0],
             "fve_without_first_tokens": round(fve(sae, later), 4),
             "features": sae.n_features, "k": sae.k, "layer": sae.layer,
             "training": sae.meta.get("training", {})}  # fmt: skip
    named = name_features(sae, m.big, m.tok, eval_texts(9002, args.texts),
                          mood_texts(9003, args.texts), sae.names)  # fmt: skip
    m.tok.padding_side = "left"
    steering = steering_rows(m, sae, quality.negative_prompts(args.prompts),
                             args.vector_coeffs, args.sae_coeffs)  # fmt: skip
    result = {"machine": "CPU (2 cores, shared)", "reconstruction": recon, "named": named,
              "named_in_sae_json": sae.names, "steering": steering,
              "seconds": round(time.monotonic() - started)}  # fmt: skip
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(table(result))


def table(r: dict) -> str:
    rec = r["reconstruction"]
    lines = [f"SAE: layer {rec['layer']}, {rec['features']} features, k = {rec['k']}; "
             f"FVE {rec['fve_held_out']:.3f} on {rec['tokens']} held-out tokens "
             f"({rec['fve_without_first_tokens']:.3f} without each text's first)", "",
             "| concept | feature | precision | recall | firings |", "|---|---|---|---|---|"]  # fmt: skip
    for concept, n in r["named"].items():
        lines.append(f"| {concept} | {n['feature']} | {n['precision']:.1%} | {n['recall']:.1%} "
                     f"| {n['firings']} |")  # fmt: skip
    lines += ["", "| steering of gloomy openings | coeff | positive | grammatical |",
              "|---|---|---|---|"]  # fmt: skip
    for s in r["steering"]:
        lines.append(f"| {s['steering']} | {s['coeff']} | {s['positive']:.0%} | {s['valid']:.0%} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
