"""Train the toy world models: `python -m models.builtin.train --out DIR [--schedule full|short]`
(`--schedule continue --init DIR0`: DIR0's big model further and its adapters anew;
`--schedule adapters --init DIR0`: new `rewrite` and `list` adapters on DIR0's big model;
`--schedule qa --init DIR0`: a new `qa` adapter on DIR0's big model).

Writes DIR/big (Qwen3, base: stories + copy-from-context questions), DIR/small (same data, a
quarter of the width), DIR/adapters/{rewrite,qa,list} (LoRA of the big model, one per task) and
DIR/small_adapters/positive (LoRA of the small model that continues any story cheerfully: the
proxy-tuning expert), plus DIR/training.json (steps, losses, seconds, device). Every example is
drawn from models/builtin/world.py with fixed seeds, so a run is reproducible up to GPU
nondeterminism. Weights are stored in bfloat16; load them in float32 on CPU.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from models.builtin import world
from models.builtin.tokenizer import IM_END, IM_START, PAD_TOKEN, TOKENIZER_DIR, tokenizer_files

Example = tuple[list[int], list[int]]  # token ids, loss mask (1 = predict this token)
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class Phase:
    """One training run: steps, batch size and peak learning rate. With `seconds` it also ends
    once that much time has passed (the learning rate anneals on whichever runs out first), so
    a run on a lent machine with a time limit still ends with annealed, saved weights."""

    steps: int
    batch: int
    lr: float
    seconds: float | None = None


@dataclass
class Schedule:
    """Model shapes and training phases of one schedule; `task_phases` overrides
    `adapter_phase` for the named big-model adapter tasks. A phase of None keeps that model
    from `--init` as it is; without shapes, the base models continue from `--init`."""

    big: dict | None
    small: dict | None
    big_phase: Phase | None
    small_phase: Phase | None
    adapter_phase: Phase
    lora_rank: int = 8
    task_phases: dict[str, Phase | None] = field(default_factory=dict)


def cpu_adapters(kept: list[str]) -> Schedule:
    """New big-model adapters on `--init`'s base, sized for a CPU; the base models, the small
    model's adapter and the adapters of the `kept` tasks stay as they are."""
    return Schedule(
        big=None,
        small=None,
        big_phase=None,
        small_phase=None,
        adapter_phase=Phase(1000, 128, 3e-3),
        lora_rank=16,
        task_phases=dict.fromkeys(kept),
    )


SCHEDULES = {
    "full": Schedule(
        big=dict(
            hidden_size=192,
            num_hidden_layers=6,
            num_attention_heads=6,
            num_key_value_heads=2,
            head_dim=32,
            intermediate_size=512,
        ),  # fmt: skip
        small=dict(
            hidden_size=96,
            num_hidden_layers=3,
            num_attention_heads=3,
            num_key_value_heads=1,
            head_dim=32,
            intermediate_size=256,
        ),  # fmt: skip
        big_phase=Phase(2500, 512, 3e-3),
        small_phase=Phase(1500, 512, 3e-3),
        adapter_phase=Phase(600, 256, 3e-3),
        lora_rank=16,
        # qa answers without the copied sentence's lead-in, so its LoRA must learn to find
        # the fact from the question alone: more steps than the other tasks.
        task_phases={"qa": Phase(1500, 256, 3e-3)},
    ),
    # More base training on `--init`'s models (copying from the sources is what the base
    # learns last), then new big-model adapters; the small model and `positive` are kept.
    # Time-boxed to fit one call on a lent GPU: 138 s of phases, plus about 30 s of start-up.
    "continue": Schedule(
        big=None,
        small=None,
        big_phase=Phase(2000, 512, 1.5e-3, seconds=72),
        small_phase=None,
        adapter_phase=Phase(600, 512, 3e-3, seconds=13),
        lora_rank=16,
        task_phases={
            "list": Phase(600, 512, 3e-3, seconds=19),
            "qa": Phase(1500, 512, 3e-3, seconds=34),
        },
    ),
    # New `rewrite` and `list` adapters on `--init`'s base (about 25 minutes on two cores).
    # Finishes a `continue` run cut short.
    "adapters": cpu_adapters(kept=["qa"]),
    # A new `qa` adapter on `--init`'s base (about 19 minutes on two shared cores), for the
    # `qa` task drawn without rival facts.
    "qa": cpu_adapters(kept=["rewrite", "list"]),
    "short": Schedule(
        big=dict(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=32,
            intermediate_size=128,
        ),  # fmt: skip
        small=dict(
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=1,
            num_key_value_heads=1,
            head_dim=32,
            intermediate_size=64,
        ),  # fmt: skip
        big_phase=Phase(30, 8, 3e-3),
        small_phase=Phase(20, 8, 3e-3),
        adapter_phase=Phase(10, 8, 3e-3),
    ),
}


class ChatEncoder:
    """Turns raw text and chat turns into token ids + loss masks, the way the chat template does."""

    def __init__(self):
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
        self.pad_id = self.tok.convert_tokens_to_ids(PAD_TOKEN)
        self.im_end_id = self.tok.convert_tokens_to_ids(IM_END)

    def ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def raw(self, prompt: str, continuation: str) -> Example:
        """Plain text: loss on the continuation and the final <|endoftext|>."""
        a = self.ids(prompt) if prompt else []
        b = self.ids((" " if prompt else "") + continuation) + [self.pad_id]
        return a + b, [0] * len(a) + [1] * len(b)

    def chat(self, messages: list[world.Message], answer: str) -> Example:
        """A chat: loss on the assistant's answer and its <|im_end|>."""
        prompt = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)
        a = self.ids(prompt + f"{IM_START}assistant\n")
        b = self.ids(answer) + [self.im_end_id]
        return a + b, [0] * len(a) + [1] * len(b)


def base_example(enc: ChatEncoder, rng: random.Random) -> Example:
    """The base models' data: raw stories, chat stories and copy-from-context questions
    (about random passages and about documents like the built-in ones)."""
    r = rng.random()
    if r < 0.2:
        sentences = world.story(rng, rng.random() < 0.5)
        cut = rng.randrange(len(sentences))
        return enc.raw(" ".join(sentences[:cut]), " ".join(sentences[cut:]))
    if r < 0.4:
        return enc.chat(*world.story_chat(rng, rng.random() < 0.5))
    question = world.context_question if r < 0.7 else world.document_question
    messages, answer, _ = question(rng)
    return enc.chat(messages, answer)


def positive_example(enc: ChatEncoder, rng: random.Random) -> Example:
    """The proxy-tuning expert's data: any opening, then a wholly positive continuation."""
    cast = rng.sample(world.PEOPLE, rng.randint(2, 3))
    opening = " ".join(world.story(rng, rng.random() < 0.5, rng.randint(1, 3), cast=cast))
    rest = " ".join(world.story(rng, True, rng.randint(2, 4), consistency=1.0, cast=cast))
    if rng.random() < 0.5:
        return enc.raw(opening, rest)
    ask = rng.choice(["Continue the story: {s}", "{s}"]).format(s=opening)
    return enc.chat([{"role": "user", "content": ask}], rest)


def task_example(task: str, enc: ChatEncoder, rng: random.Random) -> Example:
    """An adapter task's data: a task prompt and its reference answer, as a chat."""
    prompt, answer = world.sample_task_prompt(task, rng)
    return enc.chat([{"role": "user", "content": prompt}], answer)


def batch_tensors(examples: list[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and loss mask (right padding needs no attention mask in a causal LM)."""
    width = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.float32)
    for i, (x, m) in enumerate(examples):
        ids[i, : len(x)] = torch.tensor(x)
        mask[i, : len(m)] = torch.tensor(m, dtype=torch.float32)
    return ids, mask


class ExampleStream(torch.utils.data.IterableDataset):
    """Endless batches of examples; worker k of n draws from its own seed (seed, k)."""

    def __init__(self, make_example, batch: int, seed: int):
        self.make_example, self.batch, self.seed = make_example, batch, seed

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        rng = random.Random(f"{self.seed}-{info.id if info else 0}")
        enc = ChatEncoder()
        while True:
            yield batch_tensors(
                [self.make_example(enc, rng) for _ in range(self.batch)], enc.pad_id
            )


def batches(make_example, phase: Phase, seed: int, workers: int):
    """Batches drawn in worker processes (in a fixed order, so runs are reproducible)."""
    stream = ExampleStream(make_example, phase.batch, seed)
    if workers == 0:
        return iter(stream)
    loader = torch.utils.data.DataLoader(
        stream,
        batch_size=None,
        num_workers=workers,
        prefetch_factor=8,
        persistent_workers=False,
        pin_memory=torch.cuda.is_available(),
    )
    return iter(loader)


def train(model, make_example, phase: Phase, seed: int, device, workers: int = 0) -> dict:
    """AdamW with warmup + cosine decay on masked next-token loss; returns a loss log."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(
        params, lr=phase.lr, weight_decay=0.01, betas=(0.9, 0.98), fused=device.type == "cuda"
    )
    warmup = max(1, phase.steps // 20)
    model.train()
    use_bf16 = device.type == "cuda"
    losses, start = [], time.time()

    def progress(step: int) -> float:
        done = step / phase.steps
        if phase.seconds:
            done = max(done, (time.time() - start) / phase.seconds)
        return min(1.0, done)

    stream = batches(make_example, phase, seed, workers)
    while (done := progress(len(losses))) < 1.0:
        for group in opt.param_groups:
            warm = min(1.0, (len(losses) + 1) / warmup)
            group["lr"] = phase.lr * warm * 0.5 * (1 + math.cos(math.pi * done))
        ids, mask = (t.to(device, non_blocking=True) for t in next(stream))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            logits = model(input_ids=ids).logits[:, :-1].float()
        loss_tok = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1), reduction="none"
        )
        target_mask = mask[:, 1:]
        # Each example weighs the same, so short answers count as much as long stories.
        per_example = (loss_tok.view_as(target_mask) * target_mask).sum(1) / target_mask.sum(1)
        loss = per_example.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.detach())  # no .item() here: a sync per step stalls the GPU
    model.eval()
    losses = torch.stack(losses).tolist()
    tail = losses[-max(1, len(losses) // 10) :]
    return {
        "steps": len(losses),
        **({"steps_planned": phase.steps, "seconds_limit": phase.seconds} if phase.seconds else {}),
        "batch": phase.batch,
        "lr": phase.lr,
        "first_loss": round(losses[0], 4),
        "final_loss": round(sum(tail) / len(tail), 4),
        "seconds": round(time.time() - start, 1),
    }


def new_model(shape: dict, enc: ChatEncoder, seed: int):
    from transformers import Qwen3ForCausalLM

    from models.builtin.tiny import qwen3_config

    torch.manual_seed(seed)
    return Qwen3ForCausalLM(qwen3_config(shape, len(enc.tok), enc.im_end_id, enc.pad_id))


def load_base(path: Path):
    """A trained base model of `path` in float32, to train further."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)


def save_base(model, out: Path, enc: ChatEncoder) -> None:
    """bfloat16 safetensors + config + generation config (eos: <|im_end|>, <|endoftext|>)."""
    from transformers import GenerationConfig

    model.generation_config = GenerationConfig(
        eos_token_id=[enc.im_end_id, enc.pad_id], pad_token_id=enc.pad_id, do_sample=False
    )
    model.to(torch.bfloat16).save_pretrained(str(out), safe_serialization=True)
    model.float()
    for path in tokenizer_files():
        shutil.copy(path, out / path.name)


def train_lora(
    base, make_example, phase: Phase, rank: int, seed: int, device, out: Path, workers: int
) -> dict:
    """Train a LoRA on `base` (left unchanged) and save it as a bfloat16 PEFT directory."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                        target_modules=LORA_TARGETS, task_type="CAUSAL_LM")  # fmt: skip
    model = get_peft_model(base, config)
    log = train(model, make_example, phase, seed, device, workers)
    model.save_pretrained(str(out))
    model.unload()
    weights = out / "adapter_model.safetensors"
    save_file({k: v.to(torch.bfloat16) for k, v in load_file(weights).items()}, weights)
    config = json.loads((out / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = None  # where `--init` was read from means nothing later
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    (out / "README.md").unlink(missing_ok=True)
    return log


def train_all(
    out: Path,
    schedule: str = "full",
    device: str | None = None,
    workers: int = 0,
    init: Path | None = None,
) -> dict:
    """Train every toy model into `out` (written to out.tmp, then renamed); returns the log.
    With `init` (a directory laid out like `out`) the base models start from its weights."""
    plan = SCHEDULES[schedule]
    keeps = None in (plan.big, plan.small, plan.big_phase, plan.small_phase)
    if init is None and (keeps or None in plan.task_phases.values()):
        raise ValueError(f"schedule '{schedule}' continues trained models: give --init DIR")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    enc = ChatEncoder()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    log: dict = {"schedule": schedule, "device": str(dev), "plan": asdict(plan)}
    if init is not None:
        log["init"] = str(init)
    if dev.type == "cuda":
        log["device_name"] = torch.cuda.get_device_name(dev)
    start = time.time()

    def done(name: str, entry: dict) -> None:
        log[name] = entry
        print(f"{name}: {json.dumps(entry)}", flush=True)

    def keep(name: str, *paths: str) -> None:
        for path in paths:
            shutil.copytree(init / path, tmp / path)
        log[name] = f"kept from {init}"

    def base_model(shape: dict | None, name: str, seed: int):
        if init is not None:
            return load_base(init / name).to(dev)
        return new_model(shape, enc, seed).to(dev)

    # Each base is saved (rounded to bfloat16) before its adapters train, so they fit the
    # weights that ship.
    big = base_model(plan.big, "big", seed=0)
    log["big_params"] = sum(p.numel() for p in big.parameters())
    if plan.big_phase is None:
        keep("big", "big")
    else:
        done("big", train(big, base_example, plan.big_phase, seed=1, device=dev, workers=workers))
        save_base(big, tmp / "big", enc)
    for i, task in enumerate(world.TASKS):
        phase = plan.task_phases.get(task, plan.adapter_phase)
        if phase is None:
            keep(f"adapter_{task}", f"adapters/{task}")
            continue
        done(f"adapter_{task}", train_lora(
            big, partial(task_example, task), phase, plan.lora_rank,
            seed=10 + i, device=dev, out=tmp / "adapters" / task, workers=workers,
        ))  # fmt: skip

    if plan.small_phase is None:
        keep("small", "small", "small_adapters")
    else:
        small = base_model(plan.small, "small", seed=2)
        log["small_params"] = sum(p.numel() for p in small.parameters())
        done(
            "small",
            train(small, base_example, plan.small_phase, seed=3, device=dev, workers=workers),
        )
        save_base(small, tmp / "small", enc)
        done("small_adapter_positive", train_lora(
            small, positive_example, plan.adapter_phase, plan.lora_rank,
            seed=20, device=dev, out=tmp / "small_adapters" / "positive", workers=workers,
        ))  # fmt: skip

    log["total_seconds"] = round(time.time() - start, 1)
    (tmp / "training.json").write_text(json.dumps(log, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return log


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="Output directory.")
    parser.add_argument("--schedule", choices=sorted(SCHEDULES), default="full")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present).")
    parser.add_argument("--workers", type=int, default=0, help="Data worker processes.")
    parser.add_argument(
        "--init", type=Path, default=None, help="Start from this directory's trained models."
    )
    args = parser.parse_args()
    log = train_all(args.out, args.schedule, args.device, args.workers, args.init)
    print(json.dumps({k: v for k, v in log.items() if k != "plan"}, indent=2))


if __name__ == "__main__":
    main()
