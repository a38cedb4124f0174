"""Fixed-size KV-cache blocks handed to sequences: a block table per sequence over a pool of
reference-counted blocks, with prefix caching (see models.engine.prefix_cache) when on."""

from __future__ import annotations

from collections.abc import Callable

from models.engine.prefix_cache import BlockHash, BlockPool, chain_hash
from models.engine.sequence import Sequence


class BlockManager:
    """Owns block ids 1..num_blocks-1 (block 0 is the null block, see models.engine.attention).

    A sequence's block table covers its first `len(block_table) * block_size` tokens; blocks
    are added as tokens are computed and returned on finish, abort, preemption or backtrack.
    With `prefix_caching`, full computed blocks are offered to the cache (`commit`) and an
    admitted sequence starts from the cached blocks of its prompt (`cached_prefix`, `admit`).
    """

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        prefix_caching: bool = False,
        copy_block: Callable[[int, int], None] | None = None,
    ):
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.pool = BlockPool(num_blocks, copy_block)
        self.prefix_caching = prefix_caching
        self.content_key: Callable[[Sequence], BlockHash] = lambda seq: b""
        self.queried_tokens = 0  # prompt tokens of admitted sequences (prefix caching on)
        self.hit_tokens = 0  # of those, found in the cache

    @property
    def num_usable(self) -> int:
        return self.num_blocks - 1

    @property
    def num_free(self) -> int:
        """Blocks a sequence can get: free ones and cached ones no sequence holds."""
        return self.pool.num_free

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0

    def blocks_for(self, num_tokens: int) -> int:
        return (num_tokens + self.block_size - 1) // self.block_size

    def extra_blocks(self, seq: Sequence, num_tokens: int) -> int:
        """Blocks `seq` still needs so that its first `num_tokens` tokens have slots."""
        return max(0, self.blocks_for(num_tokens) - len(seq.block_table))

    def can_grow(self, seq: Sequence, num_tokens: int) -> bool:
        return self.extra_blocks(seq, num_tokens) <= self.num_free

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        for _ in range(self.extra_blocks(seq, num_tokens)):
            seq.block_table.append(self.pool.allocate())

    def fit(self, seq: Sequence, num_tokens: int) -> bool:
        """Make seq's table exactly what its first `num_tokens` tokens need (grow or shrink);
        False, changing nothing, when too few blocks are free. (No prefix caching: the
        steering small model's caches use this.)"""
        table, need = seq.block_table, self.blocks_for(num_tokens)
        if len(table) < need:
            if need - len(table) > self.num_free:
                return False
            table.extend(self.pool.allocate() for _ in range(need - len(table)))
        while len(table) > need:
            self.pool.drop(table.pop())
        return True

    def cached_prefix(self, seq: Sequence) -> list[int]:
        """The cached blocks a sequence about to be admitted (nothing computed) can start
        from: its prompt's leading full blocks, never the last token (whose logits are
        needed). Takes nothing yet."""
        if not self.prefix_caching or seq.block_table or seq.num_computed:
            return []
        key = self.content_key(seq)
        if key != seq.cache_key:
            seq.cache_key, seq.block_hashes = key, []
        seq.cache_epoch = seq.steer_epoch
        limit = (len(seq.token_ids) - 1) // self.block_size
        self._hash(seq, limit)
        return self.pool.lookup(seq.block_hashes[:limit])

    def admit(self, seq: Sequence, cached: list[int], num_tokens: int) -> bool:
        """Give a waiting sequence its cached blocks and room for `num_tokens` more tokens
        after them; False, changing nothing, when too few blocks are free."""
        start = len(cached) * self.block_size
        need = self.blocks_for(start + num_tokens) - len(cached) + self.pool.cost(cached)
        if need > self.num_free:
            return False
        for block in cached:
            self.pool.take(block)
        seq.block_table = list(cached)
        seq.num_computed = start
        seq.num_committed = len(cached)
        if self.prefix_caching:
            self.queried_tokens += len(seq.token_ids)
            self.hit_tokens += start
        self.grow(seq, start + num_tokens)
        return True

    def commit(self, seq: Sequence) -> None:
        """Offer seq's newly computed full blocks to the cache; none once its steering
        vectors changed since admission (its K/V then mixes two contents)."""
        if not self.prefix_caching or seq.cache_epoch != seq.steer_epoch:
            return
        full = min(seq.num_computed // self.block_size, len(seq.block_table))
        if full <= seq.num_committed:
            return
        self._hash(seq, full)
        for i in range(seq.num_committed, full):
            self.pool.register(seq.block_table[i], seq.block_hashes[i])
        seq.num_committed = full

    def _hash(self, seq: Sequence, num_blocks: int) -> None:
        """Extend seq.block_hashes to its first `num_blocks` (full) blocks."""
        hashes, bs = seq.block_hashes, self.block_size
        prev = hashes[-1] if hashes else seq.cache_key
        for i in range(len(hashes), num_blocks):
            prev = chain_hash(prev, seq.token_ids[i * bs : (i + 1) * bs])
            hashes.append(prev)

    def shrink(self, seq: Sequence, num_tokens: int) -> None:
        """Return blocks beyond what the first `num_tokens` tokens need (backtrack), and make
        every block the sequence will write again its own."""
        keep = self.blocks_for(num_tokens)
        while len(seq.block_table) > keep:
            self.pool.drop(seq.block_table.pop())
        if self.prefix_caching:
            self._unshare_tail(seq)

    def _unshare_tail(self, seq: Sequence) -> None:
        """After a rewind: blocks from the one holding position num_computed on are written
        again, so a shared one is copied (or, with no block free, recomputed) and a
        registered one only this sequence holds leaves the cache."""
        bs, table = self.block_size, seq.block_table
        first = seq.num_computed // bs
        del seq.block_hashes[len(seq.token_ids) // bs :]
        seq.num_committed = min(seq.num_committed, first)
        for i in range(first, len(table)):
            block = table[i]
            if self.pool.refs[block] > 1:
                if self.pool.copy_block is None or not self.num_free:
                    while len(table) > i:
                        self.pool.drop(table.pop())
                    seq.num_computed = i * bs
                    return
                table[i] = self.pool.allocate()
                self.pool.copy_block(block, table[i])
                self.pool.drop(block)
            else:
                self.pool.unregister(block)

    def release(self, seq: Sequence) -> None:
        """Give back all of seq's blocks (its computed full blocks stay cached)."""
        self.commit(seq)
        for block in reversed(seq.block_table):  # the prompt's head is evicted last
            self.pool.drop(block)
        seq.block_table = []
        if self.prefix_caching:
            seq.block_hashes, seq.num_committed = [], 0
