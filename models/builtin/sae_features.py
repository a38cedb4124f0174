"""Find and name the toy SAE's features that mean something in the toy world.

Held-out stories and chat prompts are labelled per token from the world's vocabularies (a
person's name, a positive or a negative sentiment word, a place, a colour, an object); for each
such concept the feature whose firing best matches it (F1 over tokens, at least 20 firings)
gets its name. Moods are labelled by context: in stories of one mood, every token after the
first sentiment word is `sunny` or `gloomy`; the feature with the highest recall among those
at least 90 % precise gets the mood's name (a mood feature, not a word feature, is what steers
a continuation). Precision (of the tokens where it fires, the share of the concept) and recall
are reported. Names are written into the SAE's sae.json, so `sae:positive` is a steering vector
and `/v1/features/extract` shows the names.

    nice python -m models.builtin.sae_features            # prints the table, updates sae.json
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

import torch

from models.builtin import TOY_DIR, quality, world
from models.steering.policies.probe import block_outputs
from models.steering.sae import SparseAutoencoder, load_sae

CONCEPTS = {
    "person": set(world.PEOPLE),
    "positive": set(world.POSITIVE_WORDS),
    "negative": set(world.NEGATIVE_WORDS),
    "place": set(world.PLACES),
    "color": set(world.COLORS),
    "object": set(world.OBJECTS),
}
MOODS = ("sunny", "gloomy")
MIN_FIRINGS = 20
MIN_MOOD_PRECISION = 0.9


def eval_texts(seed: int, n: int) -> list[str]:
    """Held-out stories, half of them as chat prompts (a seed training never used)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        s = " ".join(world.story(rng, rng.random() < 0.5))
        out.append(quality.chat_text(f"Continue the story: {s}") if i % 2 else s)
    return out


def mood_texts(seed: int, n: int) -> list[tuple[str, bool]]:
    """Stories of one mood each (every sentiment sentence sunny, or every one gloomy), half as
    chat prompts, with their mood (True: sunny)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        sunny = i % 2 == 0
        s = " ".join(world.story(rng, sunny, consistency=1.0, drift=False))
        out.append((quality.chat_text(f"Continue the story: {s}") if i % 4 < 2 else s, sunny))
    return out


def token_labels(tokenizer, text: str, sunny: bool | None = None) -> dict[str, torch.Tensor]:
    """Per concept, which tokens of the text lie inside a word of it; with a story's mood
    (`sunny`), which tokens come after its first sentiment word (moods; else no token)."""
    enc = tokenizer(text, return_offsets_mapping=True)
    words = [(m.start(), m.end(), m.group()) for m in re.finditer(r"[A-Za-z]+", text)]
    labels = {c: torch.zeros(len(enc.input_ids), dtype=torch.bool)
              for c in (*CONCEPTS, *MOODS, "context")}  # fmt: skip
    sentiment = world.POSITIVE_WORDS | world.NEGATIVE_WORDS
    first = next((end for _, end, w in words if w in sentiment), None)
    if sunny is not None and first is not None:
        after = torch.tensor([a >= first for a, _ in enc.offset_mapping])
        labels["sunny" if sunny else "gloomy"] = after
        labels["context"] = after
    for t, (a, b) in enumerate(enc.offset_mapping):
        for start, end, word in words:
            if a < end and b > start and b > a:
                for concept, vocab in CONCEPTS.items():
                    if word in vocab:
                        labels[concept][t] = True
    return labels


@torch.no_grad()
def fired_and_labels(sae, model, tokenizer, texts: list[tuple[str, bool | None]]):
    """Which features fire per token [tokens, features] and the tokens' labels per concept."""
    plain = [t for t, _ in texts]
    acts, labels = [], {}
    for (text, sunny), states in zip(texts, block_outputs(model, tokenizer, plain, [sae.layer]),
                                     strict=True):  # fmt: skip
        acts.append(sae.encode(states) > 0)
        for c, y in token_labels(tokenizer, text, sunny).items():
            labels.setdefault(c, []).append(y)
    return torch.cat(acts).float(), {c: torch.cat(y).float() for c, y in labels.items()}


def best_feature(fired: torch.Tensor, y: torch.Tensor, min_precision: float | None,
                 feature: int | None = None) -> dict:  # fmt: skip
    """The feature matching labels y best (by F1, or by recall among the min_precision ones),
    or the given `feature`, with its precision, recall and firings."""
    n_fired = fired.sum(0)
    hits = y @ fired
    precision, recall = hits / n_fired.clamp_min(1), hits / y.sum().clamp_min(1)
    ok = n_fired >= MIN_FIRINGS
    if min_precision is None:
        score = 2 * precision * recall / (precision + recall).clamp_min(1e-9)
    else:
        score = torch.where(precision >= min_precision, recall, precision - 1)
    best = int(torch.where(ok, score, torch.full_like(score, -9)).argmax())
    best = best if feature is None else feature
    return {"feature": best, "precision": round(float(precision[best]), 4),
            "recall": round(float(recall[best]), 4), "firings": int(n_fired[best]),
            "concept_tokens": int(y.sum())}  # fmt: skip


def name_features(sae: SparseAutoencoder, model, tokenizer, texts: list[str],
                  moods: list[tuple[str, bool]], named: dict[str, int] | None = None) -> dict:  # fmt: skip
    """Per concept: the best-matching feature (or the one `named` gives it), its precision,
    recall and firings (words over `texts`; moods over the tokens in mood context of
    `moods`)."""
    named = named or {}
    fired, labels = fired_and_labels(sae, model, tokenizer, [(t, None) for t in texts])
    out = {c: best_feature(fired, labels[c], None, named.get(c)) for c in CONCEPTS}
    fired, labels = fired_and_labels(sae, model, tokenizer, moods)
    context = labels["context"].bool()
    for mood in MOODS:
        out[mood] = best_feature(fired[context], labels[mood][context], MIN_MOOD_PRECISION,
                                 named.get(mood))  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sae", default=str(TOY_DIR / "sae"))
    ap.add_argument("--texts", type=int, default=400)
    ap.add_argument("--seed", type=int, default=4242)
    ap.add_argument("--dry-run", action="store_true", help="print, leave sae.json as it is")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from models.steering.vectors import load_transformers_model

    sae = load_sae(args.sae)
    model, tokenizer = load_transformers_model(str(TOY_DIR / "big"))
    found = name_features(sae, model, tokenizer, eval_texts(args.seed, args.texts),
                          mood_texts(args.seed + 1, args.texts))  # fmt: skip
    print("| concept | feature | precision | recall | firings |")
    print("|---|---|---|---|---|")
    for concept, r in found.items():
        print(f"| {concept} | {r['feature']} | {r['precision']:.1%} | {r['recall']:.1%} | "
              f"{r['firings']} |")  # fmt: skip
    if not args.dry_run:
        path = Path(args.sae) / "sae.json"
        info = json.loads(path.read_text())
        info["names"] = {c: r["feature"] for c, r in found.items()}
        info["named_by"] = {"script": "models/builtin/sae_features.py", "texts": args.texts,
                            "seed": args.seed, "features": found}  # fmt: skip
        path.write_text(json.dumps(info, indent=1) + "\n")
        print(f"names written to {path}")


if __name__ == "__main__":
    main()
