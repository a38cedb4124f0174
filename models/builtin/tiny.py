"""builtin:tiny: random-weight Qwen3 models (big and small) and LoRA adapters, built on first use.

The weights mean nothing; they exist so engines, steering and serving can be tested end to end
on a CPU in seconds. The build is deterministic (fixed seeds) and cached on disk under
`$TANDEM_CACHE` (default `~/.cache/tandem/models/`), keyed by a hash of the builder settings and
the shared tokenizer. A file lock serialises concurrent builders; each build is written to a
temporary directory and renamed into place, so a reader never sees half a model.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from models.builtin.tokenizer import IM_END, PAD_TOKEN, TOKENIZER_DIR, tokenizer_files
from models.builtin.world import TASKS

BUILDER_VERSION = 1
BIG_SHAPE = dict(
    hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
    head_dim=32, intermediate_size=384,
)  # fmt: skip
SMALL_SHAPE = dict(
    hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, intermediate_size=192,
)  # fmt: skip
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SMALL_ADAPTERS = ("positive",)


def cache_root() -> Path:
    """Where built models are cached: `$TANDEM_CACHE` or `~/.cache/tandem/models`."""
    root = os.environ.get("TANDEM_CACHE") or os.path.expanduser("~/.cache/tandem/models")
    return Path(root)


def build_key() -> str:
    """Short hash of everything the tiny build depends on; a change rebuilds into a new dir."""
    h = hashlib.sha256(json.dumps([BUILDER_VERSION, BIG_SHAPE, SMALL_SHAPE]).encode())
    for path in tokenizer_files():
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:12]


def qwen3_config(shape: dict, vocab_size: int, eos_id: int, pad_id: int):
    """A Qwen3 config of the given shape with tied embeddings and 1024 positions."""
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=vocab_size,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        rope_theta=10000.0,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        bos_token_id=None,
        **shape,
    )


def save_model(model, out: Path) -> None:
    """Save a causal LM with the shared tokenizer and a generation config ending at <|im_end|>."""
    from transformers import AutoTokenizer, GenerationConfig

    tok = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    model.generation_config = GenerationConfig(
        eos_token_id=tok.convert_tokens_to_ids(IM_END),
        pad_token_id=tok.convert_tokens_to_ids(PAD_TOKEN),
        do_sample=False,
    )
    model.save_pretrained(str(out), safe_serialization=True)
    for path in tokenizer_files():
        shutil.copy(path, out / path.name)


def random_model(shape: dict, seed: int):
    """A randomly initialised Qwen3ForCausalLM of `shape`, float32, seeded."""
    import torch
    from transformers import AutoTokenizer, Qwen3ForCausalLM

    tok = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    config = qwen3_config(
        shape, len(tok), tok.convert_tokens_to_ids(IM_END), tok.convert_tokens_to_ids(PAD_TOKEN)
    )
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(config).float().eval()


def random_lora(model, out: Path, seed: int, rank: int = 8) -> None:
    """Save a LoRA adapter of `model` with random (non-zero) A and B, so it visibly changes outputs."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(
        r=rank, lora_alpha=2 * rank, target_modules=LORA_TARGETS, init_lora_weights=False,
        task_type="CAUSAL_LM",
    )  # fmt: skip
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(str(out))
    peft_model.unload()


def build_tiny(out: Path) -> None:
    """Write big/, small/, adapters/<task>/ and small_adapters/positive/ under `out`."""
    big = random_model(BIG_SHAPE, seed=0)
    save_model(big, out / "big")
    for i, task in enumerate(TASKS):
        random_lora(big, out / "adapters" / task, seed=100 + i)
    small = random_model(SMALL_SHAPE, seed=1)
    save_model(small, out / "small")
    for i, name in enumerate(SMALL_ADAPTERS):
        random_lora(small, out / "small_adapters" / name, seed=200 + i)


def ensure_tiny() -> Path:
    """Directory of the built tiny models, building it first if the cache lacks it."""
    root = cache_root()
    final = root / f"tiny-{build_key()}"
    if (final / "big" / "config.json").exists():
        return final
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "tiny.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if (final / "big" / "config.json").exists():
                return final
            tmp = Path(tempfile.mkdtemp(prefix=".tiny-build-", dir=root))
            try:
                build_tiny(tmp)
                os.rename(tmp, final)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return final
