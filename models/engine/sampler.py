"""Token choice per row: logit bias, temperature (0 = greedy), top-k, top-p, seeded sampling.

Each sequence owns a torch.Generator, so a seeded request draws the same random numbers
whatever else shares its batch. Logprobs are the log-softmax of the row's logits after
logit_bias and steering adjustments, before temperature and top-k/top-p truncation (the
model's own distribution as the client shaped it, defined for greedy rows too).
"""

from __future__ import annotations

import torch

from models.engine.device import to_device
from models.engine.penalties import apply_penalties
from models.engine.sequence import Sequence
from models.protocol.outputs import TokenLogprob
from models.protocol.requests import SamplingParams


def apply_logit_biases(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Add each row's logit_bias (rows without one are untouched)."""
    biased = [(i, p.logit_bias) for i, p in enumerate(params) if p.logit_bias]
    if not biased:
        return logits
    logits = logits.clone()
    for i, bias in biased:
        ids = torch.tensor(list(bias), dtype=torch.long, device=logits.device)
        values = torch.tensor(list(bias.values()), dtype=logits.dtype, device=logits.device)
        logits[i].index_add_(0, ids, values)
    return logits


def truncate(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Set logits outside each row's top-k / nucleus top-p set to -inf.

    logits [rows, vocab]; top_k [rows] (0 = off); top_p [rows] (1 = off). One sort for the batch.
    """
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    vocab = logits.shape[-1]
    rank = torch.arange(vocab, device=logits.device)
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), vocab)
    outside = rank[None, :] >= k[:, None]
    probs = sorted_logits.softmax(-1)
    outside |= probs.cumsum(-1) - probs > top_p[:, None]  # the most likely token always stays
    return logits.masked_fill(torch.zeros_like(outside).scatter(-1, order, outside), float("-inf"))


def token_logprobs(logprobs: torch.Tensor, token_id: int, num_top: int) -> TokenLogprob:
    """The chosen token's logprob and the top alternatives from one row of log-softmax values."""
    top: list[tuple[int, float]] = []
    if num_top > 0:
        values, ids = logprobs.topk(min(num_top, logprobs.shape[-1]))
        top = [(int(i), float(v)) for i, v in zip(ids.tolist(), values.tolist(), strict=True)
               if v > float("-inf")]  # tokens a grammar or min_tokens barred are no alternative
    return TokenLogprob(token_id=token_id, logprob=float(logprobs[token_id]), top=top)


def sample(logits: torch.Tensor, seqs: list[Sequence],
           eos_token_ids: set[int] = frozenset()) -> list[tuple[int, TokenLogprob | None]]:  # fmt: skip
    """Pick one token per row of logits [rows, vocab] (float32, adjustments applied except
    logit bias and penalties); returns (token id, logprob or None) per row. `eos_token_ids`
    are barred before a row's min_tokens.

    Batched: temperature, top-k and top-p are row-wise tensor ops, and a sampled row draws by
    the exponential race (argmax of p / E with E ~ Exp(1) from the row's own generator: an
    exact categorical draw), so the whole batch costs one device sync, not one per row.
    """
    params = [s.request.params for s in seqs]
    if all(p.temperature == 0 and p.logprobs is None and not p.logit_bias and not p.penalized()
           for p in params):  # fmt: skip
        return [(token, None) for token in logits.argmax(-1).tolist()]  # one device sync
    logits = apply_penalties(apply_logit_biases(logits, params), seqs, eos_token_ids)
    tokens = logits.argmax(-1)
    sampled_rows = [i for i, p in enumerate(params) if p.temperature > 0]
    if sampled_rows:
        device = logits.device
        picked = [params[i] for i in sampled_rows]
        rows = to_device(sampled_rows, torch.int64, device)
        temperature = to_device([p.temperature for p in picked], logits.dtype, device)
        scaled = logits[rows] / temperature[:, None]
        if any(p.top_k > 0 or p.top_p < 1 for p in picked):
            top_k = to_device([p.top_k for p in picked], torch.int64, device)
            top_p = to_device([p.top_p for p in picked], logits.dtype, device)
            scaled = truncate(scaled, top_k, top_p)
        probs = scaled.softmax(-1)
        noise = torch.empty_like(probs)
        for j, i in enumerate(sampled_rows):
            noise[j].exponential_(generator=seqs[i].generator)
        tokens[rows] = (probs / noise).argmax(-1)
    token_list = tokens.tolist()
    wants = [i for i, p in enumerate(params) if p.logprobs is not None]
    logprobs = logits[wants].log_softmax(-1) if wants else None
    out: list[tuple[int, TokenLogprob | None]] = [(t, None) for t in token_list]
    for j, i in enumerate(wants):
        out[i] = (token_list[i], token_logprobs(logprobs[j], token_list[i], params[i].logprobs))
    return out
