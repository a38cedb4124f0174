"""A sparse autoencoder (SAE) on the big model's residual stream at one layer.

TopK SAE (Gao et al., 2024): f = TopK(ReLU((h - b_dec) W_enc + b_enc)), h_hat = f W_dec + b_dec,
with unit-norm decoder rows. Its features are read per token (`/v1/features/extract`,
`tandem.activations.features`), and a feature's decoder direction is a steering vector named
`sae:<feature name or index>` (applied at the SAE's layer, scaled to the feature's typical
activation, so coeff 1 adds what the feature firing as usual adds).

On disk: a directory with `sae.safetensors` (float16 weights) and `sae.json` (layer, shape, k,
the typical activation per feature, names of the features a script found meaningful).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

SAE_PREFIX = "sae:"
BUILTIN_SAE = "builtin"


class SparseAutoencoder(torch.nn.Module):
    """TopK SAE over d_model-wide states: n_features latents, k of them non-zero per token."""

    def __init__(self, d_model: int, n_features: int, k: int, layer: int):
        super().__init__()
        self.layer, self.k = layer, k
        self.w_enc = torch.nn.Parameter(torch.empty(d_model, n_features))
        self.b_enc = torch.nn.Parameter(torch.zeros(n_features))
        self.w_dec = torch.nn.Parameter(torch.empty(n_features, d_model))
        self.b_dec = torch.nn.Parameter(torch.zeros(d_model))
        self.register_buffer("typical", torch.ones(n_features))  # mean activation when firing
        self.names: dict[str, int] = {}  # feature name -> index
        self.meta: dict[str, Any] = {}

    @property
    def n_features(self) -> int:
        return self.w_enc.shape[1]

    @property
    def d_model(self) -> int:
        return self.w_enc.shape[0]

    def encode(self, h: torch.Tensor) -> torch.Tensor:
        """Feature activations [..., n_features] (k non-zero per row) of states [..., d_model]."""
        pre = torch.relu((h.float() - self.b_dec) @ self.w_enc + self.b_enc)
        top = pre.topk(self.k, dim=-1)
        return torch.zeros_like(pre).scatter_(-1, top.indices, top.values)

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return f @ self.w_dec + self.b_dec

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(h))

    @torch.no_grad()
    def normalise_decoder(self) -> None:
        self.w_dec.div_(self.w_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8))

    def name_of(self, index: int) -> str | None:
        return next((n for n, i in self.names.items() if i == index), None)

    def feature_index(self, ref: str) -> int:
        """A feature by name or index (as text); KeyError naming the choices otherwise."""
        if ref in self.names:
            return self.names[ref]
        if ref.isdigit() and int(ref) < self.n_features:
            return int(ref)
        raise KeyError(f"SAE feature '{ref}' does not exist: give a name "
                       f"({', '.join(sorted(self.names)) or 'none'}) or an index "
                       f"0..{self.n_features - 1}")  # fmt: skip

    def direction(self, index: int) -> torch.Tensor:
        """The feature's steering direction [d_model]: its decoder row x its typical activation."""
        return (self.w_dec[index] * self.typical[index]).detach().float()

    @torch.no_grad()
    def top_features(self, h: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, indices) [tokens, top_k] of the strongest features of states [tokens, d]."""
        return self.encode(h).topk(min(top_k, self.k), dim=-1)


def save_sae(sae: SparseAutoencoder, root: str | Path) -> None:
    from safetensors.torch import save_file

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().half().contiguous() for k, v in sae.state_dict().items()}
    save_file(tensors, str(root / "sae.safetensors"))
    info = {"layer": sae.layer, "k": sae.k, "d_model": sae.d_model, "n_features": sae.n_features,
            "names": sae.names, **sae.meta}  # fmt: skip
    (root / "sae.json").write_text(json.dumps(info, indent=1) + "\n")


def load_sae(root: str | Path) -> SparseAutoencoder:
    """An SAE directory (sae.safetensors + sae.json), in float32, on the CPU."""
    from safetensors.torch import load_file

    root = Path(root)
    info = json.loads((root / "sae.json").read_text())
    sae = SparseAutoencoder(info["d_model"], info["n_features"], info["k"], info["layer"])
    sae.load_state_dict({k: v.float() for k, v in load_file(str(root / "sae.safetensors")).items()})
    sae.names = {str(k): int(v) for k, v in info.get("names", {}).items()}
    sae.meta = {k: v for k, v in info.items()
                if k not in ("layer", "k", "d_model", "n_features", "names")}  # fmt: skip
    return sae.eval().requires_grad_(False)


def sae_dir(spec: str, big_model_path: str) -> Path:
    """Where `steering.sae` points: a directory, or `builtin` = the SAE shipped beside the
    built-in toy model (models/builtin/weights/toy/sae)."""
    if spec == BUILTIN_SAE:
        from models.builtin import TOY_DIR

        if Path(big_model_path).resolve() != (TOY_DIR / "big").resolve():
            raise ValueError("steering.sae: builtin is the SAE of builtin:toy; this model is "
                             f"{big_model_path}: train one (models/builtin/sae.py) and give "
                             "its directory")  # fmt: skip
        return TOY_DIR / "sae"
    return Path(spec).expanduser()


def load_configured_sae(spec: str | None, big_model_path: str, hidden_size: int,
                        num_layers: int) -> SparseAutoencoder | None:  # fmt: skip
    """The SAE of the steering config (None when none is set), checked against the model."""
    if not spec:
        return None
    sae = load_sae(sae_dir(spec, big_model_path))
    if sae.d_model != hidden_size or not 0 <= sae.layer < num_layers:
        raise ValueError(f"steering.sae reads {sae.d_model}-wide states at layer {sae.layer}; "
                         f"the big model has hidden size {hidden_size} and {num_layers} "
                         "layers")  # fmt: skip
    return sae


def sae_feature(sae: SparseAutoencoder | None, vector_name: str) -> int | None:
    """The feature a vector name `sae:<ref>` names, or None for any other name or a ref that
    does not exist."""
    if sae is None or not vector_name.startswith(SAE_PREFIX):
        return None
    try:
        return sae.feature_index(vector_name.removeprefix(SAE_PREFIX))
    except KeyError:
        return None


def sae_steering_tensor(sae: SparseAutoencoder, index: int, num_layers: int) -> torch.Tensor:
    """The engine's [num_layers, d_model] vector of a feature: its direction at the SAE's layer."""
    out = torch.zeros(num_layers, sae.d_model)
    out[sae.layer] = sae.direction(index)
    return out
