"""Stop conditions and incremental output: which tokens and text of a sequence are final.

Text is the decode of all generated tokens, kept incrementally (each step decodes only a few
tokens before the new ones); what is sent is a prefix of it that can no longer change: characters that may still be the start of a stop string, an incomplete UTF-8
character, and (for steered rows) the text of the last `max_backtrack` tokens are held back.
"""

from __future__ import annotations

from typing import Any

from models.engine.sequence import Sequence, SequenceStatus
from models.protocol.outputs import RequestOutput

DECODE_WINDOW = 6  # tokens decoded again before new ones, so merges at the edge come out right


class OutputBuilder:
    def __init__(self, tokenizer: Any | None, eos_token_ids: set[int], max_model_len: int):
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len
        # Rows decode every step: the Rust tokenizer directly is ~4x cheaper than the
        # transformers wrapper, and gives the same text when the wrapper has no clean-up to do.
        backend = getattr(tokenizer, "backend_tokenizer", None)
        cleans = getattr(tokenizer, "clean_up_tokenization_spaces", False)
        self._decode = (
            backend.decode if backend is not None and not cleans
            else tokenizer.decode if tokenizer is not None else None
        )

    def decode(self, token_ids: list[int]) -> str:
        if self._decode is None or not token_ids:
            return ""
        return self._decode(token_ids, skip_special_tokens=True)

    def generated_text(self, seq: Sequence) -> str:
        """decode(all generated tokens), from the cached text plus a short window."""
        ids = seq.generated_ids
        if self.tokenizer is None:
            return ""
        start = max(0, seq.decoded_tokens - DECODE_WINDOW)
        prefix = self.decode(ids[start : seq.decoded_tokens])
        window = self.decode(ids[start:])
        if not window.startswith(prefix):  # a merge across the window edge: decode it all
            return self.decode(ids)
        text = seq.decoded_text + window[len(prefix) :]
        if not text.endswith("\ufffd"):  # cache only complete characters
            seq.decoded_tokens, seq.decoded_text = len(ids), text
        return text

    def tail_chars(self, seq: Sequence, num_tokens: int) -> int:
        """Characters the last `num_tokens` generated tokens add to the text."""
        ids = seq.generated_ids
        if num_tokens <= 0 or not ids:
            return 0
        start = max(0, len(ids) - num_tokens - DECODE_WINDOW)
        cut = max(start, len(ids) - num_tokens)
        return len(self.decode(ids[start:])) - len(self.decode(ids[start:cut]))

    def check_stop(self, seq: Sequence, sampled: bool) -> None:
        """Finish seq when its last token, its text, or its length says so."""
        params = seq.request.params
        last = seq.token_ids[-1]
        if sampled and (
            last in params.stop_token_ids or (not params.ignore_eos and last in self.eos_token_ids)
        ):
            seq.stopped_by_token = True
            return finish(seq, "stop")
        if params.stop and self.tokenizer is not None:
            text = self.generated_text(seq)
            start = max(0, seq.num_sent_chars - max(len(s) for s in params.stop))
            hits = [i for i in (text.find(s, start) for s in params.stop) if i >= 0]
            if hits:
                seq.stop_text_index = min(hits)
                return finish(seq, "stop")
        if seq.num_generated >= params.max_tokens or len(seq.token_ids) >= self.max_model_len:
            return finish(seq, "length")

    def completion_text(self, seq: Sequence) -> str:
        if seq.forced_text is not None:
            return seq.forced_text
        if seq.stopped_by_token:
            text = self.decode(seq.generated_ids[:-1])
        else:
            text = self.generated_text(seq)
        return text if seq.stop_text_index is None else text[: seq.stop_text_index]

    def settled_text_end(self, seq: Sequence, text: str, held_tokens: int) -> int:
        """How much of `text` may be sent while seq is still running."""
        end = len(text)
        if held_tokens:
            end = min(end, len(text) - self.tail_chars(seq, held_tokens))
        while end and text[end - 1] == "\ufffd":  # an incomplete UTF-8 character
            end -= 1
        for stop in seq.request.params.stop:
            for k in range(min(len(stop) - 1, end), 0, -1):
                if text[:end].endswith(stop[:k]):
                    end -= k
                    break
        return max(end, seq.num_sent_chars)

    def collect(self, seq: Sequence, held_tokens: int = 0) -> RequestOutput | None:
        """The tokens and text of seq that became final since the last call, or None."""
        done = seq.status == SequenceStatus.FINISHED
        text = self.completion_text(seq)
        if done:
            token_end, text_end = seq.num_generated, len(text)
        else:
            token_end = max(seq.num_sent_tokens, seq.num_generated - held_tokens)
            text_end = self.settled_text_end(seq, text, held_tokens)
        new_ids = seq.generated_ids[seq.num_sent_tokens : token_end]
        if not done and not new_ids and text_end == seq.num_sent_chars and not seq.interventions:
            return None
        logprobs = None
        if seq.request.params.logprobs is not None:
            logprobs = [lp for lp in seq.logprobs[seq.num_sent_tokens : token_end] if lp]
        hidden = None
        if seq.request.hidden_layers:
            hidden = [seq.activations.pop(i, None) for i in range(seq.num_sent_tokens, token_end)]
        out = RequestOutput(
            request_id=seq.request_id,
            token_ids=new_ids,
            text=text[seq.num_sent_chars : text_end],
            finished=done,
            finish_reason=seq.finish_reason if done else None,
            logprobs=logprobs,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_generated_tokens=seq.num_generated,
            interventions=seq.interventions,
            error=seq.error,
            hidden=hidden,
            speculation=seq.speculation if done else None,
        )
        seq.interventions = []
        seq.num_sent_tokens, seq.num_sent_chars = token_end, text_end
        return out


def finish(seq: Sequence, reason: str, error: str | None = None) -> None:
    seq.status = SequenceStatus.FINISHED
    seq.finish_reason = reason
    seq.error = error
