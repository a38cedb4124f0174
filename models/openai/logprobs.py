"""Engine logprobs (token ids) as OpenAI's chat and text-completion logprob objects."""

from __future__ import annotations

from typing import Any

from models.openai.protocol import ChatLogprobs, ChatLogprobToken, CompletionLogprobs, TopLogprob


def _top(tokenizer: Any, tid: int, logprob: float) -> TopLogprob:
    tok = tokenizer.decode([tid])
    return TopLogprob(token=tok, logprob=logprob, bytes=list(tok.encode()))


def chat_logprobs(tokenizer: Any, lps: list) -> ChatLogprobs:
    content = []
    for lp in lps:
        tok = tokenizer.decode([lp.token_id])
        content.append(ChatLogprobToken(
            token=tok, logprob=lp.logprob, bytes=list(tok.encode()),
            top_logprobs=[_top(tokenizer, tid, v) for tid, v in lp.top]))  # fmt: skip
    return ChatLogprobs(content=content)


def text_logprobs(tokenizer: Any, lps: list) -> CompletionLogprobs:
    tokens = [tokenizer.decode([lp.token_id]) for lp in lps]
    offsets, pos = [], 0
    for t in tokens:
        offsets.append(pos)
        pos += len(t)
    return CompletionLogprobs(
        tokens=tokens,
        token_logprobs=[lp.logprob for lp in lps],
        top_logprobs=[{tokenizer.decode([tid]): v for tid, v in lp.top} for lp in lps],
        text_offset=offsets,
    )
