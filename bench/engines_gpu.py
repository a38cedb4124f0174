"""Torch engine vs exllamav2 (FP16 and EXL2) on one GPU, Qwen3-1.7B-shape random weights.

One run, one table: decode ms per step at batch 1 and 32, plain and with a steering vector on
4 layers (h_l += c * v_l: the torch engine's per-row steering, exllamav2's per-module forward);
teacher-forced top-1 agreement of exllamav2 FP16 and EXL2 with transformers (fp32, same
weights; random weights make near-ties, so read it as a relative figure); the cosine between
the logit change a steering vector makes in exllamav2 and in transformers. The EXL2 checkpoint
is made here with exllamav2's converter, calibrated on the toy world's text (a parquet of
stories written by models.builtin.world), the toy tokenizer copied beside the weights.

Needs torch+CUDA, transformers, safetensors, exllamav2 (+ pandas, fastparquet, ninja; its
import JIT-compiles about 2 minutes). No ray, pydantic or faiss needed beyond what models/
imports for the torch engine (pydantic).

    MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0 PYTHONUNBUFFERED=1 python3 bench/engines_gpu.py --out $OUT
    python3 bench/engines_gpu.py --skip-exl2          # FP16 only (no conversion, ~10 min less)
    python3 bench/engines_gpu.py --convert-only       # only the EXL2 checkpoint (kept in --work)

bench/gpu_exllamav2.sh runs it on a GPU machine without network, in three commands.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.engine_gpu import SHAPES, build_checkpoint  # noqa: E402
from models.builtin import resolve_source, world  # noqa: E402
from models.engine.config import EngineConfig  # noqa: E402
from models.engine.llm_engine import LLMEngine  # noqa: E402
from models.protocol.requests import GenerationRequest, SamplingParams, SteerVectorSpec  # noqa: E402

LAYERS, COEFF, PROMPT, STEPS = [4, 8, 12, 16], 2.0, 64, 64


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def prompts(batch: int, vocab: int = 700) -> list[list[int]]:
    g = torch.Generator().manual_seed(batch)
    return torch.randint(3, vocab, (batch, PROMPT), generator=g).tolist()


def torch_engine_ms(engine: LLMEngine, batch: int, steered: bool) -> float:
    """Decode ms per step of the torch engine: (time of STEPS tokens - time of 1) / (STEPS - 1)."""
    def run(n: int) -> float:
        params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
        vectors = [SteerVectorSpec("v", COEFF, LAYERS)] if steered else []
        for i, p in enumerate(prompts(batch)):
            engine.add_request(GenerationRequest(f"{time.perf_counter_ns()}-{i}", p, params,
                                                 steer_vectors=vectors))  # fmt: skip
        torch.cuda.synchronize()
        start = time.perf_counter()
        while engine.has_unfinished():
            engine.step()
        torch.cuda.synchronize()
        return time.perf_counter() - start

    run(4)
    return (run(STEPS) - run(1)) * 1000 / (STEPS - 1)


def exl_ms(engine, batch: int, deltas) -> float:
    """Decode ms per step of exllamav2's per-module forward (greedy, batch rows in lockstep)."""
    ids = torch.tensor(prompts(batch))
    engine.cache.current_seq_len = 0
    token = engine.forward(ids, engine.cache, deltas).argmax(-1, keepdim=True).cpu()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(STEPS):
        token = engine.forward(token, engine.cache, deltas).argmax(-1, keepdim=True).cpu()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1000 / STEPS


def agreement(engine, hf, n: int = 4) -> float:
    """Teacher-forced top-1 agreement with transformers over n prompts of PROMPT + 32 tokens."""
    agree = total = 0
    for ids in prompts(n):
        with torch.no_grad():
            out = hf.generate(torch.tensor([ids], device="cuda"), max_new_tokens=32,
                              min_new_tokens=32, do_sample=False)[0]  # fmt: skip
            ref = hf(out[None, :-1]).logits[0, PROMPT - 1:].argmax(-1).cpu()
        engine.cache.current_seq_len = 0
        full = out[:-1].cpu()
        first = engine.forward(full[None, :PROMPT], engine.cache)
        rows = [first] + [engine.forward(full[None, i:i + 1], engine.cache)
                          for i in range(PROMPT, len(full))]  # fmt: skip
        agree += int((torch.cat(rows).argmax(-1).cpu() == ref).sum())
        total += len(ref)
    return agree / total


def steering_cosine(engine, hf, directions: torch.Tensor) -> float:
    from models.steering.vectors import SteeringVector, steered_transformers

    ids = torch.tensor(prompts(1))
    vector = SteeringVector("v", {layer: directions[layer] for layer in LAYERS})
    with torch.no_grad():
        plain_hf = hf(ids.cuda()).logits[0, -1].float()
        with steered_transformers(hf, vector, COEFF):
            steered_hf = hf(ids.cuda()).logits[0, -1].float()
    deltas = engine.deltas(GenerationRequest("c", ids[0].tolist(),
                                             steer_vectors=[SteerVectorSpec("v", COEFF, LAYERS)]))
    engine.cache.current_seq_len = 0
    plain = engine.forward(ids, engine.cache)[0]
    engine.cache.current_seq_len = 0
    steered = engine.forward(ids, engine.cache, deltas)[0]
    return float(torch.nn.functional.cosine_similarity(steered - plain, steered_hf - plain_hf,
                                                       dim=0))  # fmt: skip


def convert_exl2(src: Path, dst: Path, bits: float) -> float:
    """EXL2 at `bits` per weight with exllamav2's converter, calibrated on toy-world stories."""
    import pandas as pd

    cal = dst.parent / "toy_world_cal.parquet"
    pd.DataFrame({"text": world.tokenizer_corpus(seed=1, n_stories=400)}).to_parquet(cal)
    work = dst.parent / "exl2_work"
    work.mkdir(exist_ok=True)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "exllamav2.conversion.convert_exl2", "-i", str(src),
                    "-o", str(work), "-cf", str(dst), "-c", str(cal), "-b", str(bits),
                    "-r", "32", "-mr", "8", "-l", "512", "-ml", "512"], check=True)  # fmt: skip
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--work", default="/tmp/tandem_engines_gpu")
    parser.add_argument("--bits", type=float, default=4.0)
    parser.add_argument("--skip-exl2", action="store_true")
    parser.add_argument("--convert-only", action="store_true",
                        help="make the EXL2 checkpoint in --work and stop (a run of its own "
                        "where one command may take 10 minutes at most)")
    args = parser.parse_args()
    work = Path(args.work)
    fp16 = work / "qwen3-1.7b-fp16"
    if not (fp16 / "config.json").exists():
        fp16.mkdir(parents=True, exist_ok=True)
        build_checkpoint(fp16, SHAPES["qwen3-1.7b"], torch.device("cuda"))
    for name in ("tokenizer.json", "tokenizer_config.json"):  # the toy tokenizer: ids < 712
        shutil.copy(Path(resolve_source("builtin:toy").big).parent.parent / "tokenizer" / name,
                    fp16 / name)  # fmt: skip
    exl2 = work / f"qwen3-1.7b-exl2-{args.bits}"
    timing = work / f"exl2-{args.bits}-convert_s.json"
    if not args.skip_exl2 and not (exl2 / "config.json").exists():
        log("EXL2 conversion")
        timing.write_text(json.dumps(round(convert_exl2(fp16, exl2, args.bits), 1)))
    if args.convert_only:
        log(f"EXL2 checkpoint in {exl2}")
        return
    results: dict = {"device": torch.cuda.get_device_name(), "layers": LAYERS, "rows": []}
    if timing.exists():
        results["exl2_convert_s"] = json.loads(timing.read_text())
    g = torch.Generator().manual_seed(0)
    shape = SHAPES["qwen3-1.7b"]
    directions = torch.randn(shape["num_hidden_layers"], shape["hidden_size"], generator=g)
    directions = directions / directions.norm(dim=-1, keepdim=True) * 4

    log("torch engine")
    engine = LLMEngine(EngineConfig(max_num_seqs=64, max_model_len=1024), str(fp16))
    engine.register_vector("v", directions)
    for batch in (1, 32):
        for steered in (False, True):
            ms = torch_engine_ms(engine, batch, steered)
            results["rows"].append({"engine": "torch", "batch": batch, "steered": steered,
                                    "ms_per_step": round(ms, 3)})  # fmt: skip
            log(results["rows"][-1])
    del engine
    torch.cuda.empty_cache()

    from transformers import AutoModelForCausalLM

    from models.engines.exllamav2 import ExLlamaV2Engine

    hf = AutoModelForCausalLM.from_pretrained(str(fp16), dtype=torch.float32).cuda().eval()
    checkpoints = {"exllamav2 fp16": fp16}
    if not args.skip_exl2:
        checkpoints[f"exllamav2 exl2 {args.bits} bpw"] = exl2
    for name, path in checkpoints.items():
        log(name)
        started = time.perf_counter()
        ex = ExLlamaV2Engine(EngineConfig(kind="exllamav2", max_model_len=1024), str(path),
                             batch_size=32)  # fmt: skip
        load_s = time.perf_counter() - started
        ex.register_vector("v", directions)
        deltas = ex.deltas(GenerationRequest("d", [1], steer_vectors=[
            SteerVectorSpec("v", COEFF, LAYERS)]))  # fmt: skip
        ex.cache.current_seq_len = 0
        for batch in (1, 32):
            for steered in (False, True):
                ms = exl_ms(ex, batch, deltas if steered else None)
                results["rows"].append({"engine": name, "batch": batch, "steered": steered,
                                        "ms_per_step": round(ms, 3)})  # fmt: skip
                log(results["rows"][-1])
        results[f"{name}: load_s"] = round(load_s, 1)
        results[f"{name}: top1_agreement_vs_transformers"] = round(agreement(ex, hf), 4)
        results[f"{name}: steering_logit_change_cosine"] = round(
            steering_cosine(ex, hf, directions), 4)
        log({k: v for k, v in results.items() if k.startswith(name)})
        del ex
        torch.cuda.empty_cache()

    print(f"\n{results['device']}, Qwen3-1.7B shape, decode ms per step (prompt {PROMPT})")
    print(f"{'engine':<28}{'bs 1':>9}{'bs 1 steered':>14}{'bs 32':>9}{'bs 32 steered':>15}")
    by = {(r["engine"], r["batch"], r["steered"]): r["ms_per_step"] for r in results["rows"]}
    for name in ["torch", *checkpoints]:
        cells = [by.get((name, b, s), float("nan")) for b in (1, 32) for s in (False, True)]
        print(f"{name:<28}{cells[0]:>9.3f}{cells[1]:>14.3f}{cells[2]:>9.3f}{cells[3]:>15.3f}")
    for key, value in results.items():
        if ":" in key or key == "exl2_convert_s":
            print(f"{key}: {value}")
    out = Path(args.out) / "engines_gpu.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    log(f"wrote {out}")


if __name__ == "__main__":
    main()
