"""Continuous batching: which sequences run in the next step and how many tokens each adds.

Running sequences go first, those decoding (one token each) before those still prefilling, so
a long prompt's chunks never hold decode rows back; then waiting ones are admitted in arrival
order while the token budget (max_num_batched_tokens), max_num_seqs and free cache blocks allow;
long prompts are prefilled in chunks over several steps. With prefix caching, a sequence is
admitted onto the cached blocks of its prompt, and one whose next block a running sequence is
prefilling right now (n > 1, the same prompt sent twice) waits for it to land in the cache
instead of computing it again (when at least WAIT_FOR_SIBLING_MIN_TOKENS are to gain). When a running
sequence needs a block and none is free, the most recently arrived running sequence is
preempted: its blocks are freed and it is recomputed from its tokens when readmitted.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from models.engine.block_manager import BlockManager
from models.engine.sequence import Sequence, SequenceStatus

# a shared prompt part shorter than this costs less to compute again than a step of waiting
WAIT_FOR_SIBLING_MIN_TOKENS = 64


@dataclass
class ScheduledSequence:
    seq: Sequence
    num_tokens: int  # tokens of seq run in this step, starting at seq.num_computed

    @property
    def samples(self) -> bool:
        """True when this step reaches the end of the sequence, so its logits pick a token."""
        return self.seq.num_computed + self.num_tokens == len(self.seq.token_ids)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_batched_tokens: int):
        self.blocks = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_batched_tokens = max_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[ScheduledSequence]:
        budget = self.max_batched_tokens
        scheduled: list[ScheduledSequence] = []
        for seq in self.running:  # blocks the last step completed join the cache
            self.blocks.commit(seq)
        # stable: decode rows keep arrival order, and so do the prefilling rows behind them
        for seq in sorted(self.running, key=lambda s: s.num_uncomputed > 1):
            if seq.status != SequenceStatus.RUNNING or budget == 0 or seq.num_uncomputed == 0:
                continue  # (nothing to run: a row parked until the Steerer answers)
            num_tokens = min(seq.num_uncomputed, budget)
            if not self._make_room(seq, seq.num_computed + num_tokens, scheduled):
                continue
            self.blocks.grow(seq, seq.num_computed + num_tokens)
            scheduled.append(ScheduledSequence(seq, num_tokens))
            budget -= num_tokens
        deferred: list[Sequence] = []
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting.popleft()
            cached = self.blocks.cached_prefix(seq)
            if self._behind_sibling(seq, len(cached)):
                deferred.append(seq)
                continue
            num_tokens = min(seq.num_uncomputed - len(cached) * self.blocks.block_size, budget)
            if not self.blocks.admit(seq, cached, num_tokens):
                self.waiting.appendleft(seq)
                break
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            scheduled.append(ScheduledSequence(seq, num_tokens))
            budget -= num_tokens
        self.waiting.extendleft(reversed(deferred))
        return scheduled

    def _behind_sibling(self, seq: Sequence, num_cached: int) -> bool:
        """True when the first block seq would compute is one a running sequence with the same
        prefix has not finished computing yet: next step seq finds it in the cache."""
        hashes, end = seq.block_hashes, (num_cached + 1) * self.blocks.block_size
        if (len(hashes) - num_cached) * self.blocks.block_size < WAIT_FOR_SIBLING_MIN_TOKENS:
            return False
        return any(
            r.num_computed < end and len(r.block_hashes) > num_cached
            and r.block_hashes[num_cached] == hashes[num_cached]
            for r in self.running
        )  # fmt: skip

    def _make_room(self, seq: Sequence, num_tokens: int, scheduled: list) -> bool:
        """Preempt later arrivals (not yet scheduled this step) until seq fits; False when seq
        itself had to be preempted."""
        if self.blocks.can_grow(seq, num_tokens):  # the common case: no set built per row
            return True
        taken = {id(s.seq) for s in scheduled}
        while not self.blocks.can_grow(seq, num_tokens):
            victims = [s for s in self.running if s is not seq and id(s) not in taken]
            victim = victims[-1] if victims else seq
            self.preempt(victim)
            if victim is seq:
                return False
        return True

    def preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.release(seq)
        seq.reset_for_recompute()
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def remove(self, seq: Sequence) -> None:
        """Take a finished or aborted sequence out and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.release(seq)
