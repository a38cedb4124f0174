"""The grammar mask's cost: which library, and what it adds to a decode step.

    python bench/grammar.py --mode libs   # llguidance / xgrammar / outlines-core, same vocab
    python bench/grammar.py --mode cpu    # built-in toy model, batch 32 (target <= 15 %)
    PYTHONUNBUFFERED=1 python bench/grammar.py --mode gpu --out $OUT   # Qwen3-1.7B shape (<= 10 %)
    python bench/grammar.py --mode gpu --device cpu --shape tiny --steps 8 --repeats 1  # logic check

libs: compile time of a nested JSON schema and the mean time to fill one row's mask and advance
it by one token, walking a valid document, over a synthetic byte-level BPE vocabulary of
151,936 tokens (Qwen3's size; no hub here, so the vocabulary is built: every token is an
earlier token plus one character, like BPE merges) and over the toy tokenizer. A library that is
not importable is skipped (xgrammar pulls triton, so it is measured from a `pip install
--no-deps --target` directory given by --extra-path).
cpu / gpu: the engine stepped with 32 rows at temperature 1, unconstrained then all constrained
by the nested schema, alternating runs, the first decode steps of each run only (no row has
finished yet): step time, and the mask's share (fill + apply + advance, timed inside the step in
separate runs; on a GPU the timing syncs the device, so the share is an upper bound and the
overhead of the untimed runs is the figure to hold against the target).
Prints a table and writes bench/results/grammar_<mode>.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SCHEMA = {
    "type": "object", "additionalProperties": False, "required": ["user", "orders", "note"],
    "properties": {
        "user": {"type": "object", "additionalProperties": False,
                 "required": ["name", "age", "address", "tags"],
                 "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                "address": {"type": "object", "additionalProperties": False,
                                            "required": ["city", "zip"],
                                            "properties": {"city": {"type": "string"},
                                                           "zip": {"type": "string",
                                                                   "pattern": "^[0-9]{5}$"}}},
                                "tags": {"type": "array", "items": {"type": "string"}}}},
        "orders": {"type": "array", "items": {
            "type": "object", "additionalProperties": False, "required": ["id", "price", "paid"],
            "properties": {"id": {"type": "integer"}, "price": {"type": "number"},
                           "paid": {"type": "boolean"},
                           "status": {"enum": ["new", "sent", "done"]}}}},
        "note": {"type": "string"},
    },
}  # fmt: skip
DOCUMENT = {"user": {"name": "Mia Rossi", "age": 31, "address": {"city": "Turin", "zip": "10121"},
                     "tags": ["gold", "early"]},
            "orders": [{"id": 7, "price": 12.5, "paid": True, "status": "sent"},
                       {"id": 8, "price": 3.0, "paid": False}],
            "note": "Leave the parcel at the door, please."}  # fmt: skip


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def synthetic_tokenizer(vocab_size: int = 151936, seed: int = 0):
    """A byte-level BPE tokenizer of `vocab_size` tokens (two special ones last): every token
    is an earlier one plus one character, so the merges are valid and the vocabulary is a trie
    of word-like pieces (letters mostly, leading spaces, digits and JSON punctuation)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    space = "Ġ"
    letters = "etaoinshrdlcumwfgypbvkjxqz"
    weights = [12, 9, 8, 7, 7, 6, 6, 6, 5, 4, 4, 3, 3, 2, 2, 2, 2, 2, 2, 1, 1, 1, 1, 1, 1, 1]
    chars = list(letters) + list(letters.upper()) + list("0123456789") + list('{}[]":,.-_')
    char_w = weights + [w / 4 for w in weights] + [2] * 10 + [1] * 10
    vocab = {c: i for i, c in enumerate(sorted(alphabet))}
    merges: list[tuple[str, str]] = []
    rng = random.Random(seed)
    pieces = [c for c in chars if c in vocab] + [space]
    target = vocab_size - 2
    while len(vocab) < target:
        base = rng.choice(pieces) if rng.random() < 0.7 else rng.choice(list(vocab)[:256])
        new = base + rng.choices(chars, char_w)[0]
        if len(new) > 14 or new in vocab:
            continue
        vocab[new] = len(vocab)
        merges.append((base, new[len(base):]))
        pieces.append(new)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok)
    hf.add_special_tokens({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"})
    return hf


def toy_tokenizer():
    from transformers import AutoTokenizer

    from models.builtin import resolve_source

    return AutoTokenizer.from_pretrained(resolve_source("builtin:toy").big)


def walk(make, ids: list[int], repeats: int = 3) -> float:
    """Mean microseconds to fill a mask and accept one token, over the document's tokens: the
    best of `repeats` walks, each with a fresh matcher from make() -> (fill, accept), after
    one warm-up walk (lazy tables)."""
    best = float("inf")
    for i in range(repeats + 1):
        fill, accept = make()
        t = time.perf_counter()
        for tid in ids:
            fill()
            accept(tid)
        if i:
            best = min(best, (time.perf_counter() - t) * 1e6 / len(ids))
    return best


def lib_llguidance(tok, vocab: int, ids: list[int]) -> dict:
    import llguidance
    import llguidance.hf
    import llguidance.torch

    t = time.perf_counter()
    lt = llguidance.hf.from_tokenizer(tok, n_vocab=vocab)
    tokenizer_s = time.perf_counter() - t
    t = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA, defaults={"whitespace_flexible": False})
    llguidance.LLMatcher(lt, grammar)
    compile_ms = (time.perf_counter() - t) * 1e3
    mask = torch.full((1, (vocab + 31) // 32), -1, dtype=torch.int32)

    def make():
        m = llguidance.LLMatcher(lt, grammar)
        return lambda: llguidance.torch.fill_next_token_bitmask(m, mask, 0), m.consume_token

    us = walk(make, ids)
    return {"tokenizer_s": tokenizer_s, "compile_ms": compile_ms, "mask_us_per_token": us}


def lib_xgrammar(tok, vocab: int, ids: list[int]) -> dict:
    import xgrammar as xgr

    t = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab)
    compiler = xgr.GrammarCompiler(info)
    tokenizer_s = time.perf_counter() - t
    t = time.perf_counter()
    compiled = compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False)
    xgr.GrammarMatcher(compiled)
    compile_ms = (time.perf_counter() - t) * 1e3
    mask = xgr.allocate_token_bitmask(1, vocab)

    def make():
        m = xgr.GrammarMatcher(compiled)
        return lambda: m.fill_next_token_bitmask(mask), m.accept_token

    us = walk(make, ids)
    return {"tokenizer_s": tokenizer_s, "compile_ms": compile_ms, "mask_us_per_token": us}


def lib_outlines_core(tok, vocab: int, ids: list[int]) -> dict:
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema

    t = time.perf_counter()
    byte_of = {c: b for b, c in zip(range(256), _bytes_to_unicode(), strict=True)}
    tokens: dict[bytes, list[int]] = {}
    eos = tok.eos_token_id
    for text, i in tok.get_vocab().items():
        if i != eos and i < vocab:
            tokens.setdefault(bytes(byte_of.get(c, 0) for c in text), []).append(i)
    vocabulary = Vocabulary(eos, tokens)
    tokenizer_s = time.perf_counter() - t
    t = time.perf_counter()
    index = Index(build_regex_from_schema(json.dumps(SCHEMA), r"[ ]?"), vocabulary)
    compile_ms = (time.perf_counter() - t) * 1e3
    mask = torch.zeros((vocab + 31) // 32, dtype=torch.int32)

    def make():
        guide = Guide(index)
        return (lambda: guide.write_mask_into(mask.data_ptr(), mask.numel(), mask.element_size()),
                guide.advance)  # fmt: skip

    us = walk(make, ids)
    return {"tokenizer_s": tokenizer_s, "compile_ms": compile_ms, "mask_us_per_token": us}


def _bytes_to_unicode() -> list[str]:
    from tokenizers import pre_tokenizers  # noqa: F401  (GPT-2's byte-to-character table)

    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    order = sorted(range(256), key=lambda k: bs[k])
    return [chr(cs[k]) for k in order]


def bench_libs(args) -> dict:
    results: dict = {}
    for vocab_name, make in (("synthetic-151936", synthetic_tokenizer), ("toy", toy_tokenizer)):
        tok = make()
        vocab = max(len(tok), 151936 if vocab_name.startswith("synthetic") else len(tok))
        ids = tok.encode(json.dumps(DOCUMENT, separators=(",", ":")), add_special_tokens=False)
        for lib, fn in (("llguidance", lib_llguidance), ("xgrammar", lib_xgrammar),
                        ("outlines-core", lib_outlines_core)):  # fmt: skip
            try:
                r = fn(tok, vocab, ids)
            except ImportError as exc:
                r = {"skipped": f"not importable: {exc}"}
            results[f"{lib} / {vocab_name}"] = r
            log(f"{lib} / {vocab_name}: {r}")
    return results


def bench_engine(args, model_path: Path, tokenizer, device: str) -> dict:
    from models.engine.config import EngineConfig
    from models.engine.llm_engine import LLMEngine
    from models.protocol.constraints import OutputConstraint
    from models.protocol.requests import GenerationRequest, SamplingParams

    batch, steps, max_tokens = args.batch, args.steps, args.steps + 64
    config = EngineConfig(device=device, max_num_seqs=batch, max_model_len=max_tokens + 64,
                          num_kv_blocks=2 + batch * ((max_tokens + 64) // 16 + 1))  # fmt: skip
    eng = LLMEngine(config, model_path, tokenizer=tokenizer)
    constraint = OutputConstraint("json_schema", json.dumps(SCHEMA))
    mask_s = [0.0]
    apply = eng.constraints.apply

    def timed_apply(logits, seqs):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = apply(logits, seqs)
        if device == "cuda":
            torch.cuda.synchronize()
        mask_s[0] += time.perf_counter() - t
        return out

    prepare = eng.constraints.prepare

    def timed_prepare(seqs):  # no sync: on a GPU it runs while the forward does
        t = time.perf_counter()
        prepare(seqs)
        mask_s[0] += time.perf_counter() - t

    advance = eng.constraints.advance

    def timed_advance(seq, token_ids):
        t = time.perf_counter()
        advance(seq, token_ids)
        mask_s[0] += time.perf_counter() - t

    prompt = tokenizer.encode("Write the order as JSON.", add_special_tokens=False)
    counter = iter(range(1 << 30))

    def run(constrained: bool, time_mask: bool) -> tuple[float, float]:
        tag = next(counter)
        for i in range(batch):
            params = SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=i, ignore_eos=True)
            eng.add_request(GenerationRequest(f"r{tag}-{i}", prompt, params,
                                              constraint=constraint if constrained else None))
        eng.step()  # prefill
        eng.constraints.apply = timed_apply if time_mask else apply
        eng.constraints.advance = timed_advance if time_mask else advance
        eng.constraints.prepare = timed_prepare if time_mask else prepare
        mask_s[0] = 0.0
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(steps):
            eng.step()
        if device == "cuda":
            torch.cuda.synchronize()
        ms = (time.perf_counter() - t) * 1e3 / steps
        alive = sum(not s.is_finished for s in eng.seqs.values())
        assert alive == batch, f"only {alive} of {batch} rows alive: the runs are not comparable"
        for rid in list(eng.seqs):
            eng.abort(rid)
        while eng.has_unfinished():
            eng.step()
        return ms, mask_s[0] * 1e3 / steps

    run(True, False)  # warm-up: compiles the grammar, builds the closing tiers
    free, constrained, mask = [], [], []
    for _ in range(args.repeats):
        free.append(run(False, False)[0])
        constrained.append(run(True, False)[0])
        mask.append(run(True, True)[1])
    # the fastest run of each: other jobs on a shared machine only ever add time
    f, c, m = min(free), min(constrained), statistics.median(mask)
    return {"batch": batch, "steps": steps, "step_ms_free": f, "step_ms_constrained": c,
            "overhead_pct": (c - f) / f * 100, "mask_ms_per_step": m,
            "mask_share_pct": m / f * 100, "runs_free_ms": free, "runs_constrained_ms": constrained}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mode", choices=["libs", "cpu", "gpu"], default="cpu")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda", help="gpu mode: where the model runs")
    ap.add_argument("--shape", default="qwen3-1.7b", help="gpu mode: a shape of engine_gpu.SHAPES")
    ap.add_argument("--checkpoints", default="/tmp/tandem_bench_checkpoints",
                    help="gpu mode: where the random checkpoint is written (3.4 GB for 1.7B)")
    ap.add_argument("--extra-path", default="", help="a --target directory with xgrammar etc.")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args()
    if args.extra_path:
        sys.path.append(args.extra_path)
    if args.mode == "libs":
        results = {"libs": bench_libs(args)}
    elif args.mode == "cpu":
        from models.builtin import resolve_source

        torch.set_num_threads(2)
        path = resolve_source("builtin:toy").big
        results = bench_engine(args, Path(path), toy_tokenizer(), "cpu")
        results["target_pct"] = 15.0
    else:
        sys.path.insert(0, str(ROOT / "bench"))
        from engine_gpu import SHAPES, build_checkpoint

        shape = SHAPES[args.shape]
        path = Path(args.checkpoints) / args.shape
        build_checkpoint(path, shape, torch.device(args.device))
        tokenizer = synthetic_tokenizer(shape["vocab_size"])
        results = bench_engine(args, path, tokenizer, args.device)
        results["target_pct"] = 10.0
        results["device"] = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
        results["shape"] = args.shape
    print(json.dumps(results, indent=1))
    if "overhead_pct" in results:
        print(f"\n| mode | batch | step free ms | step constrained ms | overhead % | mask ms/step "
              f"| mask share % | target % |\n|---|---|---|---|---|---|---|---|\n| {args.mode} | "
              f"{results['batch']} | {results['step_ms_free']:.2f} | "
              f"{results['step_ms_constrained']:.2f} | {results['overhead_pct']:.1f} | "
              f"{results['mask_ms_per_step']:.2f} | {results['mask_share_pct']:.1f} | "
              f"{results['target_pct']:.0f} |")  # fmt: skip
    else:
        print("\n| library / vocabulary | tokenizer s | compile ms | mask+advance µs/token |\n|---|---|---|---|")
        for k, r in results["libs"].items():
            if "skipped" in r:
                print(f"| {k} | skipped | | |")
            else:
                print(f"| {k} | {r['tokenizer_s']:.2f} | {r['compile_ms']:.1f} | "
                      f"{r['mask_us_per_token']:.1f} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"grammar_{args.mode}.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
