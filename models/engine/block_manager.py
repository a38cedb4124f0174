"""Fixed-size KV-cache blocks handed to sequences: a free list and a block table per sequence."""

from __future__ import annotations

from collections import deque

from models.engine.sequence import Sequence


class BlockManager:
    """Owns block ids 1..num_blocks-1 (block 0 is the null block, see models.engine.attention).

    A sequence's block table covers its first `len(block_table) * block_size` tokens; blocks
    are added as tokens are computed and returned on finish, abort, preemption or backtrack.
    """

    def __init__(self, num_blocks: int, block_size: int):
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.free: deque[int] = deque(range(1, num_blocks))

    @property
    def num_usable(self) -> int:
        return self.num_blocks - 1

    @property
    def num_free(self) -> int:
        return len(self.free)

    def blocks_for(self, num_tokens: int) -> int:
        return (num_tokens + self.block_size - 1) // self.block_size

    def extra_blocks(self, seq: Sequence, num_tokens: int) -> int:
        """Blocks `seq` still needs so that its first `num_tokens` tokens have slots."""
        return max(0, self.blocks_for(num_tokens) - len(seq.block_table))

    def can_grow(self, seq: Sequence, num_tokens: int) -> bool:
        return self.extra_blocks(seq, num_tokens) <= self.num_free

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        for _ in range(self.extra_blocks(seq, num_tokens)):
            seq.block_table.append(self.free.popleft())

    def fit(self, seq: Sequence, num_tokens: int) -> bool:
        """Make seq's table exactly what its first `num_tokens` tokens need (grow or shrink);
        False, changing nothing, when too few blocks are free."""
        table, need = seq.block_table, self.blocks_for(num_tokens)
        if len(table) < need:
            if need - len(table) > len(self.free):
                return False
            table.extend(self.free.popleft() for _ in range(need - len(table)))
        elif len(table) > need:
            self.free.extend(table[need:])
            del table[need:]
        return True

    def shrink(self, seq: Sequence, num_tokens: int) -> None:
        """Return blocks beyond what the first `num_tokens` tokens need (backtrack)."""
        keep = self.blocks_for(num_tokens)
        while len(seq.block_table) > keep:
            self.free.append(seq.block_table.pop())

    def release(self, seq: Sequence) -> None:
        self.free.extend(seq.block_table)
        seq.block_table = []
