"""Request checks every engine makes before admission: what a request gets wrong on its own,
whatever engine runs it (the torch engine adds its KV-cache and steering checks)."""

from __future__ import annotations

from models.protocol.errors import EngineError, PromptTooLongError
from models.protocol.requests import GenerationRequest, SamplingParams


def check_generation(request: GenerationRequest, vocab_size: int, max_model_len: int,
                     max_logprobs: int | None = None) -> None:  # fmt: skip
    """Raise the EngineError for an empty or out-of-vocabulary prompt, a prompt plus max_tokens
    beyond `max_model_len`, or sampling parameters the sampler would trip on. max_logprobs:
    the most logprob alternatives the engine returns (None: the whole vocabulary)."""
    params, n = request.params, len(request.prompt_token_ids)
    if n == 0:
        raise EngineError("the prompt is empty", param="prompt")
    if params.max_tokens < 1:
        raise EngineError(f"max_tokens must be >= 1, got {params.max_tokens}", "max_tokens")
    check_token_ids(request.prompt_token_ids, vocab_size, "prompt")
    check_context(n, params.max_tokens, max_model_len)
    check_sampling(params, vocab_size, vocab_size if max_logprobs is None else max_logprobs)


def check_token_ids(token_ids: list[int], vocab_size: int, what: str) -> None:
    if token_ids and (max(token_ids) >= vocab_size or min(token_ids) < 0):
        raise EngineError(f"{what} token ids must lie in [0, {vocab_size})", param=what)


def check_context(num_prompt: int, max_tokens: int, max_model_len: int) -> None:
    total = num_prompt + max_tokens
    if total > max_model_len:
        raise PromptTooLongError(
            f"the prompt ({num_prompt} tokens) plus max_tokens ({max_tokens}) is {total} "
            f"tokens; this model's context is {max_model_len}",
            param="max_tokens",
        )


def check_sampling(params: SamplingParams, vocab_size: int, max_logprobs: int) -> None:
    """What would make the sampler raise mid-step, refused before admission."""
    if params.seed is not None and not -(2**63) <= params.seed < 2**64:
        raise EngineError(f"seed must lie in [-2**63, 2**64), got {params.seed}", "seed")
    if not 0 <= params.top_k <= vocab_size:
        raise EngineError(f"top_k must lie in [0, {vocab_size}], got {params.top_k}", "top_k")
    if params.temperature < 0 or not 0 < params.top_p <= 1:
        raise EngineError("temperature must be >= 0 and top_p in (0, 1]", "temperature")
    if params.logprobs is not None and not 0 <= params.logprobs <= max_logprobs:
        raise EngineError(f"logprobs must lie in [0, {max_logprobs}], got {params.logprobs}",
                          "logprobs")  # fmt: skip
    check_token_ids(list(params.logit_bias), vocab_size, "logit_bias")
    if not (-2 <= params.presence_penalty <= 2 and -2 <= params.frequency_penalty <= 2
            and 0 < params.repetition_penalty <= 10 and params.min_tokens >= 0):
        raise EngineError("penalties must lie in [-2, 2] (presence, frequency) and (0, 10] "
                          "(repetition); min_tokens >= 0", "presence_penalty")  # fmt: skip


def check_speculative(request: GenerationRequest, has_drafter: bool, max_k: int) -> None:
    """A request's speculative k: 0..max_k, and above 0 only where a drafter is loaded."""
    k = request.speculative_k
    if k is None or k == 0:
        return
    if not 0 <= k <= max_k:
        raise EngineError(f"tandem.speculative.k must lie in [0, {max_k}] "
                          f"(engine.speculative.max_k), got {k}", "tandem.speculative.k")  # fmt: skip
    if not has_drafter:
        raise EngineError(
            "speculative decoding was asked for, but this server has no drafter loaded: set "
            "engine.speculative.drafter to small_model (or engine.speculative.k > 0), or leave "
            "tandem.speculative out", "tandem.speculative",
        )  # fmt: skip
