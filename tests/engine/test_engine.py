"""The torch engine against transformers on tiny random checkpoints (CPU, float32)."""

from __future__ import annotations

import asyncio
import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from models.engine import EngineUnavailableError, build_engine
from models.engine.config import EngineConfig
from models.engine.llm_engine import LLMEngine
from models.engine.tiny_checkpoint import build_tiny_checkpoint
from models.protocol.errors import EngineError, EngineOverloadedError, PromptTooLongError
from models.protocol.requests import GenerationRequest, SamplingParams

PROMPT_LENGTHS = (3, 17, 9, 30, 5)


@pytest.fixture(scope="module", params=["qwen3", "llama"])
def checkpoint(request, tmp_path_factory):
    path = build_tiny_checkpoint(tmp_path_factory.mktemp(request.param), request.param)
    hf = AutoModelForCausalLM.from_pretrained(str(path)).eval()
    return path, hf


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    return build_tiny_checkpoint(tmp_path_factory.mktemp("qwen3_only"), "qwen3", seed=1)


def prompts(n: int = len(PROMPT_LENGTHS), seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 512, (k,), generator=g).tolist() for k in PROMPT_LENGTHS[:n]]


def hf_greedy(hf, prompt: list[int], n: int) -> list[int]:
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, len(prompt) :].tolist()


def engine(path, **config) -> LLMEngine:
    config.setdefault("num_kv_blocks", 128)
    config.setdefault("block_size", 4)
    return LLMEngine(EngineConfig(**config), path)


def run_all(eng: LLMEngine, requests: list[GenerationRequest], join_every: int = 0) -> dict:
    """Add requests (one per `join_every` steps, or all at once) and step until done;
    request id -> (tokens, outputs)."""
    tokens: dict[str, list[int]] = {}
    outs: dict[str, list] = {}
    pending = list(requests)
    while pending or eng.has_unfinished():
        if pending:
            for _ in range(1 if join_every else len(pending)):
                eng.add_request(pending.pop(0))
        for _ in range(max(join_every, 1)):
            for out in eng.step():
                tokens.setdefault(out.request_id, []).extend(out.token_ids)
                outs.setdefault(out.request_id, []).append(out)
    return {rid: (tokens[rid], outs[rid]) for rid in tokens}


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, **kw)


def test_greedy_matches_transformers_with_staggered_joins(checkpoint):
    path, hf = checkpoint
    eng = engine(path, max_num_batched_tokens=16)  # the 30-token prompt is prefilled in chunks
    reqs = [GenerationRequest(str(i), p, greedy(12)) for i, p in enumerate(prompts())]
    got = run_all(eng, reqs, join_every=2)
    for i, p in enumerate(prompts()):
        assert got[str(i)][0] == hf_greedy(hf, p, 12), f"request {i} (prompt {len(p)} tokens)"
    assert eng.stats().max_running_seen > 1
    assert eng.stats().free_blocks == eng.stats().total_blocks


def test_preemption_with_a_tiny_cache_keeps_greedy_tokens(checkpoint):
    path, hf = checkpoint
    eng = engine(path, num_kv_blocks=16)  # 15 usable blocks of 4 tokens for ~5 x 8 blocks
    reqs = [GenerationRequest(str(i), p, greedy(16)) for i, p in enumerate(prompts(4))]
    got = run_all(eng, reqs)
    assert eng.stats().preemptions > 0
    for i, p in enumerate(prompts(4)):
        assert got[str(i)][0] == hf_greedy(hf, p, 16)
        assert got[str(i)][1][-1].finish_reason == "length"
    assert eng.stats().free_blocks == eng.stats().total_blocks


def test_same_seed_same_tokens_alone_and_in_a_busy_batch(qwen3):
    params = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.95, seed=1234)
    alone = run_all(engine(qwen3), [GenerationRequest("x", [5, 6, 7], params)])["x"][0]
    others = [
        GenerationRequest(f"o{i}", p, SamplingParams(max_tokens=12, temperature=1.0))
        for i, p in enumerate(prompts(4, seed=3))
    ]
    busy = run_all(
        engine(qwen3), others[:2] + [GenerationRequest("x", [5, 6, 7], params)] + others[2:]
    )
    assert busy["x"][0] == alone
    reseeded = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.95, seed=99)
    other = run_all(engine(qwen3), [GenerationRequest("y", [5, 6, 7], reseeded)])["y"][0]
    assert other != alone


def test_top_k_1_is_greedy(qwen3):
    p = prompts(1)[0]
    top1 = SamplingParams(max_tokens=10, temperature=1.5, top_k=1, seed=7)
    a = run_all(engine(qwen3), [GenerationRequest("a", p, top1)])["a"][0]
    b = run_all(engine(qwen3), [GenerationRequest("b", p, greedy(10))])["b"][0]
    assert a == b


def test_stop_token_and_max_tokens(qwen3):
    p = prompts(2)[1]
    ref = run_all(engine(qwen3), [GenerationRequest("r", p, greedy(12))])["r"]
    assert len(ref[0]) == 12 and ref[1][-1].finish_reason == "length"
    stop_at = next(i for i, t in enumerate(ref[0]) if i > 0 and t not in ref[0][:i])
    got = run_all(
        engine(qwen3), [GenerationRequest("s", p, greedy(12, stop_token_ids=[ref[0][stop_at]]))]
    )["s"]
    assert got[0] == ref[0][: stop_at + 1]
    assert got[1][-1].finish_reason == "stop" and got[1][-1].finished


def test_eos_from_generation_config_and_ignore_eos(qwen3, tmp_path):
    p = prompts(2)[1]
    ref = run_all(engine(qwen3), [GenerationRequest("r", p, greedy(12))])["r"][0]
    stop_at = next(i for i, t in enumerate(ref) if i > 0 and t not in ref[:i])
    ckpt = shutil.copytree(qwen3, tmp_path / "eos")
    (ckpt / "generation_config.json").write_text(json.dumps({"eos_token_id": [ref[stop_at]]}))
    got = run_all(engine(ckpt), [GenerationRequest("e", p, greedy(12))])["e"]
    assert got[0] == ref[: stop_at + 1] and got[1][-1].finish_reason == "stop"
    ignored = run_all(engine(ckpt), [GenerationRequest("i", p, greedy(12, ignore_eos=True))])["i"]
    assert ignored[0] == ref and ignored[1][-1].finish_reason == "length"


def test_logprobs_shape_sign_and_sampled_token(checkpoint):
    path, hf = checkpoint
    p = prompts(1)[0]
    got = run_all(engine(path), [GenerationRequest("l", p, greedy(6, logprobs=3))])["l"]
    logprobs = [lp for out in got[1] for lp in out.logprobs]
    assert [lp.token_id for lp in logprobs] == got[0]
    with torch.no_grad():
        first = hf(torch.tensor([p])).logits[0, -1].log_softmax(-1)
    assert logprobs[0].logprob == pytest.approx(float(first[got[0][0]]), abs=1e-4)
    for lp in logprobs:
        assert len(lp.top) == 3 and all(v <= 0 for _, v in lp.top) and lp.logprob <= 0
        assert lp.top[0] == (lp.token_id, pytest.approx(lp.logprob))  # greedy: the top one


def test_logit_bias_forces_a_token(qwen3):
    got = run_all(
        engine(qwen3), [GenerationRequest("b", [1, 2, 3], greedy(5, logit_bias={42: 100.0}))]
    )
    assert got["b"][0] == [42] * 5


def test_abort_frees_blocks_and_reports_abort(qwen3):
    eng = engine(qwen3)
    eng.add_request(GenerationRequest("keep", [1, 2, 3], greedy(8)))
    eng.add_request(GenerationRequest("drop", [4, 5, 6, 7, 8, 9], greedy(50)))
    eng.step()
    eng.step()
    assert eng.stats().free_blocks < eng.stats().total_blocks
    eng.abort("drop")
    finals = {}
    while eng.has_unfinished():
        for out in eng.step():
            if out.finished:
                finals[out.request_id] = out.finish_reason
    assert finals == {"keep": "length", "drop": "abort"}
    assert eng.stats().free_blocks == eng.stats().total_blocks


def test_request_errors_name_the_numbers(qwen3):
    eng = engine(qwen3, max_model_len=64, max_queue_len=1)
    with pytest.raises(PromptTooLongError, match=r"60 tokens.*max_tokens \(10\).*70.*64"):
        eng.add_request(GenerationRequest("long", [1] * 60, greedy(10)))
    small = engine(qwen3, num_kv_blocks=4)
    with pytest.raises(PromptTooLongError, match="KV-cache blocks"):
        small.add_request(GenerationRequest("big", [1] * 20, greedy(10)))
    eng.add_request(GenerationRequest("a", [1, 2], greedy(4)))
    with pytest.raises(EngineOverloadedError, match="queue is full"):
        eng.add_request(GenerationRequest("b", [1, 2], greedy(4)))


def test_torch_engine_streams_concurrent_requests(qwen3):
    async def main():
        eng = build_engine(EngineConfig(num_kv_blocks=64, block_size=4), str(qwen3))
        await eng.start()

        async def one(i: int):
            outs = [
                o async for o in eng.generate(GenerationRequest(str(i), [1, 2, 3 + i], greedy(8)))
            ]
            return outs

        results = await asyncio.gather(*[one(i) for i in range(6)])
        await eng.check_health()
        stats = eng.stats()
        eng.shutdown()
        return results, stats

    results, stats = asyncio.run(main())
    alone = run_all(engine(qwen3), [GenerationRequest("3", [1, 2, 6], greedy(8))])["3"][0]
    for outs in results:
        assert [len(o.token_ids) for o in outs] == [1] * 8  # token by token
        assert outs[-1].finished and outs[-1].finish_reason == "length"
        assert all(not o.finished for o in outs[:-1])
    assert [t for o in results[3] for t in o.token_ids] == alone
    assert stats.max_running_seen > 1


def test_gil_switch_interval_is_set_for_the_engines_process(qwen3):
    """engine.gil_switch_interval_ms sets Python's thread switch interval where the engine
    runs (unset leaves it as it was)."""
    import sys

    before = sys.getswitchinterval()
    try:
        build_engine(EngineConfig(num_kv_blocks=16, block_size=4), str(qwen3)).shutdown()
        assert sys.getswitchinterval() == before
        eng = build_engine(EngineConfig(num_kv_blocks=16, block_size=4,
                                        gil_switch_interval_ms=0.5), str(qwen3))  # fmt: skip
        eng.shutdown()
        assert sys.getswitchinterval() == pytest.approx(0.0005)
    finally:
        sys.setswitchinterval(before)


def test_build_engine_names_the_missing_extra(qwen3):
    with pytest.raises(EngineUnavailableError, match="optional extra 'vllm"):
        build_engine(EngineConfig(kind="vllm"), str(qwen3))


def test_stop_strings_hold_back_and_cut_text():
    builtin = pytest.importorskip("models.builtin")
    path = builtin.resolve_source("builtin:tiny").big
    eng = LLMEngine(EngineConfig(num_kv_blocks=64), path)
    tok = eng.tokenizer
    prompt = tok.encode("the cat sat on the mat and")
    ref = run_all(eng, [GenerationRequest("r", prompt, greedy(24))])["r"]
    text = "".join(o.text for o in ref[1])
    assert text == tok.decode(ref[0], skip_special_tokens=True)
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip(), "need a visible stop string"
    got = run_all(eng, [GenerationRequest("s", prompt, greedy(24, stop=[stop]))])["s"]
    streamed = "".join(o.text for o in got[1])
    assert streamed == text[: text.index(stop)]
    assert got[1][-1].finish_reason == "stop"


def test_streamed_text_equals_the_full_decode():
    builtin = pytest.importorskip("models.builtin")
    path = builtin.resolve_source("builtin:tiny").big
    eng = LLMEngine(EngineConfig(num_kv_blocks=256), path)
    prompt = eng.tokenizer.encode("a long story about")
    params = [
        SamplingParams(max_tokens=80, temperature=1.5, seed=s, ignore_eos=True) for s in range(4)
    ]
    got = run_all(eng, [GenerationRequest(str(i), prompt, p) for i, p in enumerate(params)])
    for ids, outs in got.values():
        assert "".join(o.text for o in outs) == eng.tokenizer.decode(ids, skip_special_tokens=True)


def test_a_failing_step_ends_its_requests_and_serving_goes_on(qwen3):
    """A raising model step stands in for a device fault (e.g. CUDA out of memory), which
    cannot be produced on this CPU machine."""

    async def main():
        eng = build_engine(EngineConfig(num_kv_blocks=64, block_size=4), str(qwen3))
        await eng.start()
        real_run = eng.core.runner.run

        def broken_run(*args, **kwargs):
            eng.core.runner.run = real_run
            raise RuntimeError("device fault")

        eng.core.runner.run = broken_run
        failed = [o async for o in eng.generate(GenerationRequest("f", [1, 2, 3], greedy(4)))]
        after = [o async for o in eng.generate(GenerationRequest("g", [1, 2, 3], greedy(4)))]
        await eng.check_health()
        stats = eng.stats()
        eng.shutdown()
        return failed, after, stats

    failed, after, stats = asyncio.run(main())
    assert failed[-1].finish_reason == "error" and "device fault" in failed[-1].error
    assert after[-1].finish_reason == "length" and len([t for o in after for t in o.token_ids]) == 4
    assert stats.free_blocks == stats.total_blocks


ROPE_VARIANTS = {
    "llama3-rope": (
        "llama",
        {
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 10000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            }
        },
    ),
    "linear-rope": (
        "llama",
        {"rope_parameters": {"rope_type": "linear", "rope_theta": 500.0, "factor": 4.0}},
    ),
    "qwen2-bias": ("qwen2", {}),
}


@pytest.mark.parametrize("variant", sorted(ROPE_VARIANTS))
def test_rope_scaling_and_qkv_bias_match_transformers(variant, tmp_path):
    from safetensors.torch import load_file, save_file

    model_type, overrides = ROPE_VARIANTS[variant]
    path = build_tiny_checkpoint(tmp_path, model_type, **overrides)
    if model_type == "qwen2":  # transformers starts biases at zero: give them values
        weights = load_file(str(path / "model.safetensors"))
        g = torch.Generator().manual_seed(0)
        for name in [n for n in weights if n.endswith("_proj.bias")]:
            weights[name] = torch.randn(weights[name].shape, generator=g) * 0.5
        save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    hf = AutoModelForCausalLM.from_pretrained(str(path)).eval()
    prompt = list(range(3, 90, 2))  # past original_max_position_embeddings
    got = run_all(engine(path), [GenerationRequest("v", prompt, greedy(10))])["v"][0]
    assert got == hf_greedy(hf, prompt, 10)


def test_stack_rows_views_evenly_spaced_rows_and_copies_the_rest():
    from models.engine.device import stack_rows

    batch = torch.arange(24.0).view(6, 4)
    every_other = stack_rows([batch[i] for i in (1, 3, 5)])
    assert torch.equal(every_other, torch.stack([batch[1], batch[3], batch[5]]))
    assert every_other.untyped_storage().data_ptr() == batch.untyped_storage().data_ptr()  # a view
    assert torch.equal(stack_rows([batch[2]]), batch[2:3])
    shuffled = stack_rows([batch[3], batch[0], batch[4]])  # not evenly spaced: a copy
    assert torch.equal(shuffled, batch[[3, 0, 4]])
    assert shuffled.untyped_storage().data_ptr() != batch.untyped_storage().data_ptr()
    apart = [torch.ones(4), torch.zeros(4)]  # separate tensors: a copy
    assert torch.equal(stack_rows(apart), torch.stack(apart))


def test_tuner_keys_as_the_shipped_tables_spell_them():
    from models.engine.kernels import tuning

    lora = ((2048, 1024, 1024), 1, 16)
    key = (4096, 2048, 16, torch.bfloat16, True, False, lora)
    assert tuning._table_key(key) == (
        "4096x2048 rows=16 bfloat16 partials=1 gated=0 lora=2048+1024+1024/1x16"
    )
    assert tuning._table_key((*key[:6], None)).endswith("gated=0")
    assert tuning.tuning_file_stem("NVIDIA H200") == "NVIDIA_H200"


def test_block_manager_fit_grows_shrinks_and_refuses():
    from models.engine.block_manager import BlockManager
    from models.steering.paged_small_model import PagedKV

    blocks = BlockManager(num_blocks=5, block_size=4)  # 4 usable
    seq = PagedKV()
    assert blocks.fit(seq, 9) and len(seq.block_table) == 3 and blocks.num_free == 1
    assert not blocks.fit(seq, 21) and len(seq.block_table) == 3  # 6 blocks: refused, unchanged
    assert blocks.fit(seq, 4) and len(seq.block_table) == 1 and blocks.num_free == 3
    assert blocks.fit(seq, 4) and len(seq.block_table) == 1


def test_sampling_fields_out_of_range_are_refused_before_admission(qwen3):
    eng = engine(qwen3)
    cases = [
        (SamplingParams(max_tokens=2, seed=2**64), "seed"),
        (SamplingParams(max_tokens=2, top_k=10**19), "top_k"),
        (SamplingParams(max_tokens=2, logit_bias={10**9: 1.0}), "logit_bias"),
        (SamplingParams(max_tokens=2, logprobs=10**6), "logprobs"),
    ]
    for params, field in cases:
        with pytest.raises(EngineError) as err:
            eng.check_request(GenerationRequest(f"bad-{field}", [1, 2], params))
        assert err.value.param == field
    assert not eng.has_unfinished()


def test_a_request_that_cannot_be_admitted_fails_alone(qwen3):
    """A non-EngineError at admission (a sampler that cannot take the request) stands in for
    any bug a request could trigger: it fails that request, the engine serves the rest."""

    async def main():
        eng = build_engine(EngineConfig(num_kv_blocks=64, block_size=4), str(qwen3))
        await eng.start()
        real_add = eng.core.add_request

        def add(request):
            if request.request_id == "poison":
                raise OverflowError("Overflow when unpacking long long")
            real_add(request)

        eng.core.add_request = add
        good = [eng.generate(GenerationRequest(f"g{i}", [1, 2, 3 + i], greedy(6))) for i in range(3)]
        tasks = [asyncio.create_task(_drain(g)) for g in good]
        with pytest.raises(EngineError, match="could not be admitted"):
            await _drain(eng.generate(GenerationRequest("poison", [1, 2], greedy(6))))
        done = await asyncio.gather(*tasks)
        after = await _drain(eng.generate(GenerationRequest("after", [1, 2], greedy(3))))
        await eng.check_health()
        eng.shutdown()
        return done, after

    done, after = asyncio.run(main())
    assert all(outs[-1].finish_reason == "length" for outs in done)
    assert sum(len(o.token_ids) for o in after) == 3


async def _drain(stream) -> list:
    return [o async for o in stream]


def test_a_failed_engine_answers_503_and_fails_its_health_check(qwen3):
    """A dead engine thread stands in for a fatal device error: the client gets a 503 to
    retry elsewhere, and the health check tells Ray to replace the replica."""
    from models.protocol.errors import EngineFailedError

    async def main():
        eng = build_engine(EngineConfig(num_kv_blocks=64, block_size=4), str(qwen3))
        await eng.start()
        eng._failure = RuntimeError("device lost")  # what the engine loop records as it dies
        with pytest.raises(EngineFailedError) as err:
            await _drain(eng.generate(GenerationRequest("x", [1, 2], greedy(2))))
        with pytest.raises(EngineFailedError):
            await eng.check_health()
        eng.shutdown()
        return err.value

    err = asyncio.run(main())
    assert err.status_code == 503 and "device lost" in err.message


def test_loader_keeps_one_tensor_for_tied_embeddings(checkpoint):
    """A tied checkpoint (qwen3 here) loads its embedding once and uses it as the output head;
    an untied one (llama) keeps its own head. Loading goes straight to the target dtype."""
    from models.engine.llama import load_llama

    path, hf = checkpoint
    model = load_llama(path, torch.device("cpu"), torch.bfloat16, max_len=64)
    shared = model.lm_head.data_ptr() == model.embed_tokens.weight.data_ptr()
    assert shared == bool(hf.config.tie_word_embeddings)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.layers[0].self_attn.rotary.cos.dtype == torch.float32
    torch.testing.assert_close(model.lm_head.float(), hf.lm_head.weight.detach().bfloat16().float())


def test_listen_gives_what_generate_gives_and_stop_aborts(qwen3):
    """TorchEngine.listen (one call per output on the caller's loop, what the Generator uses)
    hands over the same outputs as generate; stopping a request aborts it in the engine."""

    async def main():
        eng = build_engine(EngineConfig(num_kv_blocks=64, block_size=4), str(qwen3))
        try:
            req = lambda rid, n: GenerationRequest(rid, [1, 2, 3], greedy(n))  # noqa: E731
            streamed = [o async for o in eng.generate(req("g", 12))]
            heard, done = [], asyncio.Event()

            def sink(item):
                heard.append(item)
                if item.finished:
                    done.set()

            eng.listen(req("l", 12), sink)
            await asyncio.wait_for(done.wait(), 60)
            long_heard = []
            stop = eng.listen(req("long", 200), long_heard.append)
            while not long_heard:
                await asyncio.sleep(0.01)
            stop()
            await asyncio.sleep(0.2)
            after = len(long_heard)
            await asyncio.sleep(0.2)
            return streamed, heard, long_heard, after, eng.stats().num_running
        finally:
            eng.shutdown()

    streamed, heard, long_heard, after, running = asyncio.run(main())
    assert [o.token_ids for o in heard] == [o.token_ids for o in streamed]
    assert "".join(o.text for o in heard) == "".join(o.text for o in streamed)
    assert len(long_heard) == after and running == 0  # nothing more after stop; aborted
    assert len(long_heard) < 200 and not any(o.finished for o in long_heard)
