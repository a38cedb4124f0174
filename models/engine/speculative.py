"""Speculative decoding: a drafter proposes k tokens per decode row, the big model scores all
k + 1 positions in the step's one forward, and exactly the tokens the big model would have
picked are kept.

Greedy rows keep drafts while they equal the big model's argmax, then add the argmax at the
first mismatch (or after the last draft). Sampled rows use rejection sampling: draft i is
kept with probability min(1, p_i(d) / q_i(d)); at the first rejection a token is drawn from
max(0, p_i - q_i) normalized, and after k acceptances from p_k, so every token is distributed
as the big model's own sampling distribution p (logit bias, temperature, top-k, top-p). The
rejected drafts' K/V is rewound like a backtrack (the blocks past the kept tokens go back).

Rows whose next token depends on more than the big model's logits and the sampling settings
verified here are not speculated, and each gets one "speculation_off" intervention saying why:
a steering policy (proxy tuning, contrastive, backtracks: logit-level or token-level actions),
a grammar mask, penalties (presence / frequency / repetition, min_tokens), or hidden-state
capture (a verify position is no sampled-from state). Static steering vectors compose: they
apply to every position of the verify forward as to a prefill.
"""

from __future__ import annotations

import logging

import torch

from models.engine.device import to_device
from models.engine.sampler import apply_logit_biases, token_logprobs, truncate
from models.engine.scheduler import ScheduledSequence
from models.engine.sequence import Sequence
from models.protocol.drafter import Draft, Drafter, DraftRow
from models.protocol.outputs import Intervention, TokenLogprob

log = logging.getLogger(__name__)


class Speculator:
    """Drafts before the forward (`draft`), says which logits the forward must return
    (`logit_counts`), and turns a verified row's logits into its new tokens (`accept`)."""

    def __init__(self, drafter: Drafter, default_k: int, vocab_size: int, max_model_len: int):
        if drafter.vocab_size != vocab_size:
            raise ValueError(
                f"the drafter's vocabulary ({drafter.vocab_size}) is not the big model's "
                f"({vocab_size})"
            )
        self.drafter = drafter
        self.default_k = default_k
        self.max_model_len = max_model_len
        self.pending: dict[Sequence, Draft] = {}  # rows whose drafts this step verifies
        self.num_proposed = 0  # drafted tokens verified
        self.num_accepted = 0  # of those, kept
        self.num_verified = 0  # rows verified
        self.num_rejections = 0  # of those, with a draft rejected

    def row_k(self, request) -> int:
        """The k a request speculates with: its own, else the engine's default."""
        return self.default_k if request.speculative_k is None else request.speculative_k

    def k_for(self, seq: Sequence) -> int:
        """This step's k for seq: its k, bounded by what it may still generate."""
        left = min(seq.request.params.max_tokens - seq.num_generated,
                   self.max_model_len - len(seq.token_ids))  # fmt: skip
        return max(0, min(self.row_k(seq.request), left - 1))  # the last token is free

    @staticmethod
    def why_not(seq: Sequence) -> str | None:
        """Why seq cannot be speculated exactly here (None: it can)."""
        request = seq.request
        if seq.steering is not None:
            return "the row has a steering policy (its actions act on each token)"
        if seq.matcher is not None:
            return "the row's output follows a grammar"
        if request.params.penalized():
            return "the row's sampling has penalties or min_tokens"
        if seq.hidden_layers:
            return "the row reads the big model's hidden states"
        return None

    def draft(self, scheduled: list[ScheduledSequence], blocks, budget: int) -> None:
        """Append drafts to the scheduled decode rows that speculate (as many as `budget`
        tokens and free blocks allow), and run them in this step."""
        self.pending = {}
        rows: list[tuple[ScheduledSequence, int]] = []
        for item in scheduled:
            seq = item.seq
            if seq.speculation is None or item.num_tokens != 1 or not item.samples:
                continue
            why = self.why_not(seq)
            if why is not None:
                self._switch_off(seq, why)
                continue
            if k := self.k_for(seq):
                rows.append((item, k))
        if not rows:
            return
        k = max(k for _, k in rows)
        params = [item.seq.request.params for item, _ in rows]
        draft_rows = [
            DraftRow(s.request_id, list(s.token_ids), s.num_prompt_tokens, p.temperature,
                     s.request.adapter, s.generator, p.logit_bias)
            for (item, _), p in zip(rows, params, strict=True)
            for s in [item.seq]
        ]  # fmt: skip
        try:
            drafts = self.drafter.propose(draft_rows, k)
        except Exception:  # noqa: BLE001 - a failed draft only costs this step's speedup
            log.exception("drafting failed; this step decodes without speculation")
            return
        for (item, row_k), draft in zip(rows, drafts, strict=True):
            seq = item.seq
            n = min(row_k, len(draft.token_ids), budget)
            if n == 0 or not blocks.can_grow(seq, len(seq.token_ids) + n):
                continue
            if seq.request.params.temperature > 0 and draft.probs is None:
                continue  # no distributions: rejection sampling impossible
            probs = draft.probs[:n] if draft.probs is not None else None
            self.pending[seq] = Draft(list(draft.token_ids[:n]), probs)
            seq.token_ids.extend(draft.token_ids[:n])
            blocks.grow(seq, len(seq.token_ids))
            item.num_tokens += n
            budget -= n
            self.num_proposed += n
            seq.speculation.proposed += n

    def logit_counts(self, scheduled: list[ScheduledSequence]) -> list[int] | None:
        """Positions per row whose logits the forward returns (None: the last of each)."""
        if not self.pending:
            return None
        return [item.num_tokens if item.seq in self.pending else 1 for item in scheduled]

    def split(
        self, logits: torch.Tensor, scheduled: list[ScheduledSequence], counts: list[int]
    ) -> tuple[torch.Tensor, dict[Sequence, torch.Tensor]]:
        """Logits [sum(counts), vocab] -> each row's last position [rows, vocab], and the
        verified rows' k + 1 positions."""
        ends = torch.tensor(counts).cumsum(0)
        last = logits[(ends - 1).to(logits.device)]
        verified = {}
        for item, end, n in zip(scheduled, ends.tolist(), counts, strict=True):
            if item.seq in self.pending:
                verified[item.seq] = logits[end - n : end]
        return last, verified

    def accept(self, seq: Sequence, logits: torch.Tensor) -> list[tuple[int, TokenLogprob | None]]:
        """Take the drafts out of seq, rewind num_computed to the kept ones, and return the
        tokens to append (kept drafts + one from the big model) with their logprobs."""
        draft = self.pending.pop(seq)
        m = len(draft.token_ids)
        del seq.token_ids[-m:]
        params = seq.request.params
        biased = apply_logit_biases(logits, [params] * (m + 1))
        if params.temperature == 0:
            target = biased.argmax(-1).tolist()
            kept = 0
            while kept < m and draft.token_ids[kept] == target[kept]:
                kept += 1
            tokens = draft.token_ids[:kept] + [target[kept]]
        else:
            tokens = self._rejection_sample(seq, biased, draft)
            kept = len(tokens) - 1
        self.num_accepted += kept
        seq.speculation.accepted += kept
        self.num_verified += 1
        self.num_rejections += kept < m
        seq.num_computed = len(seq.token_ids) + kept  # the kept drafts' K/V stays
        if params.logprobs is None:
            return [(t, None) for t in tokens]
        lp = biased.log_softmax(-1)
        return [(t, token_logprobs(lp[i], t, params.logprobs)) for i, t in enumerate(tokens)]

    def _rejection_sample(self, seq: Sequence, biased: torch.Tensor, draft: Draft) -> list[int]:
        params, m, device = seq.request.params, len(draft.token_ids), biased.device
        scaled = biased / params.temperature
        if params.top_k > 0 or params.top_p < 1:
            n = scaled.shape[0]
            top_k = to_device([params.top_k] * n, torch.int64, device)
            top_p = to_device([params.top_p] * n, scaled.dtype, device)
            scaled = truncate(scaled, top_k, top_p)
        p = scaled.softmax(-1)
        q = draft.probs.to(device, p.dtype)
        ids = torch.tensor(draft.token_ids, device=device)
        rows = torch.arange(m, device=device)
        ratio = p[rows, ids] / q[rows, ids].clamp_min(1e-30)
        u = torch.rand(m, generator=seq.generator, device=device)
        rejected = (u >= ratio).tolist()
        kept = rejected.index(True) if True in rejected else m
        if kept < m:
            residual = (p[kept] - q[kept]).clamp_min(0)
            dist = residual if float(residual.sum()) > 0 else p[kept]
        else:
            dist = p[m]
        last = int(torch.multinomial(dist / dist.sum(), 1, generator=seq.generator))
        return draft.token_ids[:kept] + [last]

    def _switch_off(self, seq: Sequence, why: str) -> None:
        if not seq.speculation_off:
            seq.speculation_off = True
            seq.speculation = None
            seq.interventions.append(Intervention(
                step=seq.num_generated, action="speculation_off",
                detail={"reason": f"{why}: not speculated"},
            ))  # fmt: skip

    def release(self, request_ids: list[str]) -> None:
        self.drafter.release(request_ids)
