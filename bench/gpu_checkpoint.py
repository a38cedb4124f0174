"""Random-weight checkpoints in a real Hugging Face layout for the GPU configuration.

Writes, where serve_config.gpu.yaml looks (`~/.cache/tandem/gpu/qwen3/`), the layout the
toy models use: `big/` a Qwen3-1.7B-shaped model, `small/` a Qwen3-0.6B-shaped one (bf16,
random: speed does not depend on the values), both with the built-in tokenizer and chat
template, and `small_adapters/positive/` a random rank-16 PEFT LoRA of the small model (the
proxy-tuning expert). The built-in tokenizer knows a few hundred tokens; ids it does not know
would decode to nothing, so its vocabulary is filled up to the model's size with word tokens
(" w1234"): every sampled token streams as text, as a real model's would.

    python bench/gpu_checkpoint.py [--root ~/.cache/tandem/gpu/qwen3]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from engine_gpu import SHAPES, build_checkpoint  # noqa: E402

SMALL = dict(
    hidden_size=1024,
    num_hidden_layers=28,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=128,
    intermediate_size=3072,
    vocab_size=151936,
)
TOKENIZER = ROOT / "models" / "builtin" / "weights" / "toy" / "big"
TOKENIZER_FILES = ("tokenizer_config.json", "chat_template.jinja", "generation_config.json")


def build(root: Path) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for name, shape in (("big", SHAPES["qwen3-1.7b"]), ("small", SMALL)):
        params = build_checkpoint(root / name, shape, device, seed=0 if name == "big" else 1)
        for f in TOKENIZER_FILES:
            shutil.copy(TOKENIZER / f, root / name / f)
        write_tokenizer(root / name / "tokenizer.json", shape["vocab_size"])
        print(f"{name}: {root / name} ({params / 1e9:.2f} B params)", flush=True)
    build_lora(root / "small_adapters" / "positive", SMALL)


def write_tokenizer(path: Path, vocab_size: int) -> None:
    """The built-in byte-level BPE tokenizer with its vocabulary filled up to `vocab_size` by
    tokens that no merge produces (encoding is unchanged) and that decode to " w<id>"."""
    doc = json.loads((TOKENIZER / "tokenizer.json").read_text())
    vocab = doc["model"]["vocab"]
    first = max([*vocab.values(), *(t["id"] for t in doc["added_tokens"])]) + 1
    vocab.update({f"\u0120w{i}": i for i in range(first, vocab_size)})  # \u0120: byte-level space
    path.write_text(json.dumps(doc, ensure_ascii=False))


def build_lora(path: Path, shape: dict, rank: int = 16, seed: int = 2) -> None:
    """A random PEFT LoRA on every projection of every layer."""
    from safetensors.torch import save_file

    h, inter, d = shape["hidden_size"], shape["intermediate_size"], shape["head_dim"]
    q, kv = shape["num_attention_heads"] * d, shape["num_key_value_heads"] * d
    dims = {
        "self_attn.q_proj": (h, q),
        "self_attn.k_proj": (h, kv),
        "self_attn.v_proj": (h, kv),
        "self_attn.o_proj": (q, h),
        "mlp.gate_proj": (h, inter),
        "mlp.up_proj": (h, inter),
        "mlp.down_proj": (inter, h),
    }
    gen = torch.Generator().manual_seed(seed)
    weights = {}
    for i in range(shape["num_hidden_layers"]):
        for module, (fan_in, fan_out) in dims.items():
            key = f"base_model.model.model.layers.{i}.{module}"
            weights[f"{key}.lora_A.weight"] = (torch.randn(rank, fan_in, generator=gen) * 0.01
                                               ).to(torch.bfloat16)  # fmt: skip
            weights[f"{key}.lora_B.weight"] = (torch.randn(fan_out, rank, generator=gen) * 0.01
                                               ).to(torch.bfloat16)  # fmt: skip
    path.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank,
        "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
        "target_modules": [m.split(".")[1] for m in dims], "base_model_name_or_path": None,
    }, indent=1))  # fmt: skip
    print(f"small-model LoRA: {path} (rank {rank})", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--root", default="~/.cache/tandem/gpu/qwen3")
    build(Path(ap.parse_args().root).expanduser())


if __name__ == "__main__":
    main()
