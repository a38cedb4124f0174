"""Train the toy big model's sparse autoencoder (models/steering/sae.py) on its residual stream.

Reproducible (fixed seeds, one thread), CPU, a few minutes:

    nice python -m models.builtin.sae --out models/builtin/weights/toy/sae
    nice python -m models.builtin.sae_features     # names features, writes bench/results/sae.json

Texts: the toy world's corpus (stories, task phrasings) and chat-templated story prompts. The
states after block `--layer` of every token are collected once, then a TopK SAE is fitted
with Adam on shuffled batches, decoder rows kept unit-norm, dead features revived from badly
reconstructed states. The fraction of variance explained (FVE) on held-out texts and each
feature's typical activation are stored with the weights.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

from models.builtin import TOY_DIR, quality, world
from models.steering.sae import SparseAutoencoder, save_sae


def training_texts(seed: int, n_stories: int) -> list[str]:
    """The world's corpus plus chat-templated story continuations (what requests look like)."""
    rng = random.Random(seed)
    texts = world.tokenizer_corpus(seed, n_stories)
    texts = [t for t in texts if len(t) > 20]
    for _ in range(n_stories // 2):
        opening = " ".join(world.story(rng, rng.random() < 0.5, consistency=1.0, drift=False))
        texts.append(quality.chat_text(f"Continue the story: {opening}") + " ".join(
            world.story(rng, rng.random() < 0.5)))  # fmt: skip
    rng.shuffle(texts)
    return texts


@torch.no_grad()
def layer_states(model, tokenizer, texts: list[str], layer: int, batch: int = 64) -> torch.Tensor:
    """States after block `layer` of every token of `texts`, [tokens, hidden] (padding dropped)."""
    from models.steering.vectors import _decoder_blocks

    kept = {}
    handle = _decoder_blocks(model)[layer].register_forward_hook(
        lambda _m, _i, out: kept.__setitem__("h", out[0] if isinstance(out, tuple) else out))
    tokenizer.padding_side = "right"
    out = []
    try:
        for i in range(0, len(texts), batch):
            enc = tokenizer(texts[i : i + batch], return_tensors="pt", padding=True)
            model(**enc)
            out.append(kept["h"][enc["attention_mask"].bool()].float())
    finally:
        handle.remove()
    return torch.cat(out)


def fve(sae: SparseAutoencoder, x: torch.Tensor) -> float:
    """Fraction of variance explained: 1 - |x - x_hat|^2 / |x - mean|^2."""
    with torch.no_grad():
        err = (x - sae(x)).pow(2).sum()
        return float(1 - err / (x - x.mean(0)).pow(2).sum())


def train_sae(x: torch.Tensor, n_features: int, k: int, layer: int, steps: int, seed: int,
              batch: int = 512, lr: float = 2e-3) -> SparseAutoencoder:  # fmt: skip
    """A TopK SAE fitted to states x [tokens, d] (deterministic for a seed)."""
    g = torch.Generator().manual_seed(seed)
    sae = SparseAutoencoder(x.shape[1], n_features, k, layer)
    with torch.no_grad():
        sae.w_dec.copy_(torch.randn(n_features, x.shape[1], generator=g))
        sae.normalise_decoder()
        sae.w_enc.copy_(sae.w_dec.T)
        sae.b_dec.copy_(x.median(0).values)
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    last_fired = torch.zeros(n_features, dtype=torch.long)
    for step in range(steps):
        xb = x[torch.randint(0, x.shape[0], (batch,), generator=g)]
        f = sae.encode(xb)
        loss = (sae.decode(f) - xb).pow(2).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sae.normalise_decoder()
        last_fired[(f > 0).any(0)] = step
        if step % 500 == 499:
            revive(sae, xb, step - last_fired > 1000, g)
        for group in opt.param_groups:  # linear decay over the last fifth
            group["lr"] = lr * min(1.0, 5 * (steps - step) / steps)
    return sae.eval().requires_grad_(False)


@torch.no_grad()
def revive(sae: SparseAutoencoder, xb: torch.Tensor, dead: torch.Tensor, g: torch.Generator) -> None:
    """Point dead features at the residuals of the worst-reconstructed states of a batch."""
    n = int(dead.sum())
    if n == 0:
        return
    residual = xb - sae(xb)
    worst = residual.norm(dim=-1).topk(min(n, xb.shape[0])).indices
    picks = worst[torch.randint(0, len(worst), (n,), generator=g)]
    directions = residual[picks] / residual[picks].norm(dim=-1, keepdim=True).clamp_min(1e-8)
    sae.w_dec[dead] = directions
    sae.w_enc[:, dead] = directions.T * 0.2
    sae.b_enc[dead] = 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(TOY_DIR / "sae"))
    ap.add_argument("--layer", type=int, default=2)
    ap.add_argument("--features", type=int, default=768)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--stories", type=int, default=2400)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    from models.steering.vectors import load_transformers_model

    started = time.monotonic()
    model, tokenizer = load_transformers_model(str(TOY_DIR / "big"))
    texts = training_texts(args.seed, args.stories)
    held = len(texts) // 10
    x_held = layer_states(model, tokenizer, texts[:held], args.layer)
    x = layer_states(model, tokenizer, texts[held:], args.layer)
    print(f"{x.shape[0]} training tokens, {x_held.shape[0]} held out "
          f"({time.monotonic() - started:.0f} s)")  # fmt: skip
    sae = train_sae(x, args.features, args.k, args.layer, args.steps, args.seed)
    acts = sae.encode(x_held)
    fired = (acts > 0).sum(0)
    sae.typical.copy_(torch.where(fired > 0, acts.sum(0) / fired.clamp_min(1), torch.ones(1)))
    report = {"fve_held_out": round(fve(sae, x_held), 4), "fve_train": round(fve(sae, x[:50000]), 4),
              "dead_features_held_out": int((fired == 0).sum()), "train_tokens": x.shape[0],
              "held_out_tokens": x_held.shape[0], "seconds": round(time.monotonic() - started),
              **{k: v for k, v in vars(args).items() if k != "out"}}  # fmt: skip
    sae.meta = {"model": "builtin:toy", "training": report}
    save_sae(sae, args.out)
    print(json.dumps(report, indent=1))
    print(f"saved to {Path(args.out)}")


if __name__ == "__main__":
    main()
