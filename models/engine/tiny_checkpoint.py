"""Random tiny Llama-family checkpoints (no tokenizer) for engine tests and CPU benchmarks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def build_tiny_checkpoint(
    path: str | Path, model_type: str = "qwen3", seed: int = 0, **overrides: Any
) -> Path:
    """Save a randomly initialised transformers model (safetensors + config.json) to `path`.

    Defaults: hidden 64, 2 layers, 4 query / 2 KV heads of dim 16, vocab 512, no EOS (so greedy
    runs last max_tokens). `overrides` go to the transformers config.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    fields: dict[str, Any] = dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        tie_word_embeddings=model_type == "qwen3",
        initializer_range=0.1,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    fields.update(overrides)
    config = AutoConfig.for_model(model_type, **fields)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(str(path))
    return Path(path)
