"""The vLLM engine in-process on the built-in toy model (vLLM's CPU build; skipped without vllm):
greedy tokens equal the torch engine's, an adapter as a LoRARequest gives the torch engine's
adapted tokens, streaming and abort, logprobs, proxy tuning through vLLM's logits processor
equal to the torch engine's proxy-tuned tokens, steering vectors through forward hooks in vLLM's
workers equal to the torch engine's steered tokens, and the capability refusals.

One vLLM engine for the session (conftest.py), driven on one event loop."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm.engine")  # a real vLLM (not a folder named vllm)

from models.engine.config import EngineConfig  # noqa: E402
from models.engine.llm_engine import LLMEngine  # noqa: E402
from models.protocol.engine import UnsupportedByEngineError, check_capabilities  # noqa: E402
from models.protocol.errors import AdapterNotFoundError, EngineError  # noqa: E402
from models.protocol.requests import (  # noqa: E402
    SteerVectorSpec,
)
from models.protocol.steering import SteeringRequest  # noqa: E402
from models.steering.config import SteeringConfig  # noqa: E402
from models.steering.policies import policy_needs  # noqa: E402
from models.steering.runtime import SteeringRuntime  # noqa: E402
from tests.engines_vllm.conftest import (  # noqa: E402
    STEERING,
    TEXTS,
    N,
    request,
    tokens_of,
    torch_tokens,
    vllm_outputs,
)


def test_greedy_tokens_and_text_equal_the_torch_engine(loop, vllm_engine, torch_engine, prompts):
    reqs = [request(f"g{i}", p) for i, p in enumerate(prompts)]
    want = torch_tokens(torch_engine, reqs)
    got = vllm_outputs(loop, vllm_engine, reqs)
    for r in reqs:
        outs = got[r.request_id]
        assert tokens_of(outs) == want[r.request_id], TEXTS[int(r.request_id[1:])]
        last = outs[-1]
        assert last.finished and last.finish_reason == "length"
        assert last.num_prompt_tokens == len(r.prompt_token_ids)
        assert last.num_generated_tokens == N
        text = "".join(o.text for o in outs)
        assert text == torch_engine.tokenizer.decode(want[r.request_id], skip_special_tokens=True)


def test_an_adapter_runs_as_a_lora_request_like_the_torch_engine(loop, vllm_engine, toy, prompts):
    torch_engine = LLMEngine(EngineConfig(num_kv_blocks=256), toy.big)
    torch_engine.adapters.load("qa", toy.adapters["qa"])
    reqs = [request(f"a{i}", p, adapter="qa") for i, p in enumerate(prompts)]
    base = vllm_outputs(loop, vllm_engine, [request(f"b{i}", p) for i, p in enumerate(prompts)])
    got = vllm_outputs(loop, vllm_engine, reqs)
    want = torch_tokens(torch_engine, reqs)
    assert {r: tokens_of(o) for r, o in got.items()} == want
    assert [tokens_of(o) for o in got.values()] != [tokens_of(o) for o in base.values()]
    assert vllm_engine.adapters() == ["list", "qa"]


def test_adapters_load_and_unload_at_runtime(loop, vllm_engine, toy, prompts):
    loop.run_until_complete(vllm_engine.load_adapter("rewrite", toy.adapters["rewrite"]))
    assert "rewrite" in vllm_engine.adapters()
    vllm_outputs(loop, vllm_engine, [request("rw", prompts[0], adapter="rewrite")])
    loop.run_until_complete(vllm_engine.unload_adapter("rewrite"))
    with pytest.raises(AdapterNotFoundError, match="'rewrite' is not loaded; loaded: list, qa"):
        vllm_engine.check_request(request("rw2", prompts[0], adapter="rewrite"))


def test_streaming_comes_in_steps_and_abort_ends_the_stream(loop, vllm_engine, prompts):
    async def run():
        outs = []
        async for out in vllm_engine.generate(request("s1", prompts[0], max_tokens=400)):
            outs.append(out)
            if len(outs) == 3:
                await vllm_engine.abort("s1")
        return outs

    outs = loop.run_until_complete(run())
    assert len(outs) >= 3 and all(o.token_ids for o in outs[:3])
    assert outs[-1].finished and outs[-1].finish_reason == "abort"
    assert outs[-1].num_generated_tokens < 400
    assert vllm_engine.stats().num_running == 0


def test_logprobs_match_the_torch_engine(loop, vllm_engine, toy, prompts):
    torch_engine = LLMEngine(EngineConfig(num_kv_blocks=256), toy.big)
    r = request("lp", prompts[1], max_tokens=4, logprobs=3)
    torch_engine.add_request(r)
    want = []
    while torch_engine.has_unfinished():
        want += [lp for out in torch_engine.step() for lp in out.logprobs or []]
    got = [lp for out in vllm_outputs(loop, vllm_engine, [r])["lp"] for lp in out.logprobs]
    assert [g.token_id for g in got] == [w.token_id for w in want]
    for g, w in zip(got, want, strict=True):
        assert g.logprob == pytest.approx(w.logprob, abs=1e-3)
        assert [i for i, _ in g.top] == [i for i, _ in w.top]


def test_proxy_tuning_and_contrastive_equal_the_torch_engine(loop, vllm_engine, toy, prompts):
    runtime = SteeringRuntime.from_source(SteeringConfig.model_validate(STEERING), "builtin:toy")
    torch_engine = LLMEngine(EngineConfig(num_kv_blocks=256), toy.big)
    torch_engine.set_step_observer(runtime)
    reqs = [request(f"{policy}{i}", p, steering=SteeringRequest(policy, mode="sync"))
            for policy in ("proxy", "contrast") for i, p in enumerate(prompts)]  # fmt: skip
    want = torch_tokens(torch_engine, reqs)
    got = {rid: tokens_of(outs) for rid, outs in vllm_outputs(loop, vllm_engine, reqs).items()}
    assert got == want
    plain = vllm_outputs(loop, vllm_engine, [request(f"p{i}", p) for i, p in enumerate(prompts)])
    assert [got[f"proxy{i}"] for i in range(len(prompts))] != [tokens_of(o) for o in
                                                                 plain.values()]  # fmt: skip


def test_what_vllm_cannot_do_is_a_400_naming_engine_and_capability(vllm_engine, prompts):
    needs = policy_needs(SteeringConfig.model_validate(STEERING).policies)
    guard = request("g", prompts[0], steering=SteeringRequest("guard"))
    mix = request("m", prompts[0], adapter_weights={"qa": 0.6, "list": 0.4})
    back = request("b", prompts[0], steering=SteeringRequest("proxy",
                                                             params={"max_backtrack": 2}))
    capture = request("h", prompts[0], hidden_layers=[1])
    for bad, capability in [(guard, "token_events"),
                            (mix, "adapter_mix"), (back, "backtrack"),
                            (capture, "hidden_state_capture")]:  # fmt: skip
        with pytest.raises(UnsupportedByEngineError, match=f"engine 'vllm'.*{capability}") as e:
            check_capabilities(vllm_engine, bad, needs)
        assert e.value.status_code == 400
        with pytest.raises(UnsupportedByEngineError, match=capability):
            vllm_engine.check_request(bad)  # the engine refuses on its own too
    check_capabilities(vllm_engine, request("ok", prompts[0], steering=SteeringRequest("proxy")),
                       needs)  # fmt: skip
    with pytest.raises(EngineError, match="'nope' is not configured for the vllm engine"):
        vllm_engine.check_request(request("n", prompts[0], steering=SteeringRequest("nope")))


def test_steering_vectors_through_hooks_equal_the_torch_engine(loop, vllm_engine, toy, prompts):
    import torch

    torch_engine = LLMEngine(EngineConfig(num_kv_blocks=256), toy.big)
    g = torch.Generator().manual_seed(0)
    vector = torch.randn(torch_engine.args.num_layers, torch_engine.args.hidden_size, generator=g)
    for engine in (torch_engine, vllm_engine):
        engine.register_vector("rand", vector)
    specs = {"all": [SteerVectorSpec("rand", 1.5)], "two": [SteerVectorSpec("rand", 3.0, [1, 4])]}
    reqs = [request(f"{k}{i}", p, steer_vectors=v) for k, v in specs.items()
            for i, p in enumerate(prompts[:2])]  # fmt: skip
    plain = [request(f"plain{i}", p) for i, p in enumerate(prompts[:2])]
    got = {rid: tokens_of(o) for rid, o in vllm_outputs(loop, vllm_engine, reqs + plain).items()}
    want = torch_tokens(torch_engine, reqs + plain)
    assert got == want  # steered rows beside plain rows of the same prompts in one batch
    assert got["all0"] != got["plain0"] and got["two1"] != got["plain1"]
    again = vllm_outputs(loop, vllm_engine, [request("plain-again", prompts[0])])  # cached prefix
    assert tokens_of(again["plain-again"]) == got["plain0"]
    with pytest.raises(EngineError, match="layers \\[9\\] outside"):
        vllm_engine.check_request(request("x", prompts[0],
                                          steer_vectors=[SteerVectorSpec("rand", 1.0, [9])]))
    with pytest.raises(EngineError, match="'nope'"):
        vllm_engine.check_request(request("x", prompts[0], steer_vectors=[SteerVectorSpec("nope", 1.0)]))


def test_without_eager_mode_steering_vectors_are_refused():
    from models.engines.vllm.engine import engine_args

    args = engine_args(EngineConfig(kind="vllm", device="cuda", cuda_graphs=True), "/m", None)
    assert not args["enforce_eager"] and "worker_extension_cls" not in args
    args = engine_args(EngineConfig(kind="vllm", device="cuda", cuda_graphs=False), "/m", None)
    assert args["enforce_eager"] and args["worker_extension_cls"].endswith("SteeringWorkerExtension")
