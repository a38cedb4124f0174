"""The shared byte-level BPE tokenizer of the built-in models, with a Qwen-style chat template.

Trained on the toy-world corpus (`world.tokenizer_corpus`) and shipped in the repo under
`weights/tokenizer/`, so builtin:tiny and builtin:toy (big and small) all use the same ids.
Rebuild with `python -m models.builtin.tokenizer`.
"""

from __future__ import annotations

from pathlib import Path

TOKENIZER_DIR = Path(__file__).parent / "weights" / "tokenizer"
VOCAB_SIZE = 1536
PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [PAD_TOKEN, IM_START, IM_END]  # ids 0, 1, 2

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def train_tokenizer(out_dir: str | Path = TOKENIZER_DIR, seed: int = 0) -> Path:
    """Train the BPE tokenizer on the world corpus and save it as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from models.builtin.world import tokenizer_corpus

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(tokenizer_corpus(seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=PAD_TOKEN,
        additional_special_tokens=[IM_START, IM_END],
        chat_template=CHAT_TEMPLATE,
        model_max_length=1024,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out))
    return out


def tokenizer_files(tokenizer_dir: str | Path = TOKENIZER_DIR) -> list[Path]:
    """The files that make up the saved tokenizer (copied beside every built-in model)."""
    return sorted(p for p in Path(tokenizer_dir).iterdir() if p.is_file())


if __name__ == "__main__":
    print(train_tokenizer())
