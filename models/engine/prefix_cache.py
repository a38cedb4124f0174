"""Prefix caching: KV blocks shared between sequences by reference count, found by content.

A full, computed block is known by a chained hash: the hash of the block before it, the
block's tokens, and (in the first block) the sequence's content key, i.e. everything
besides tokens that changes K/V: the LoRA adapters with their weights and the steering
vectors with their coefficients, layers and values. A sequence admitted with a prompt whose
first blocks hash to registered blocks takes those blocks (reference +1) instead of
prefilling them. A block nobody references stays registered, evictable least-recently-freed
first, and is only reused for other tokens when no free block is left.

A registered block is never written again: blocks are registered only once all their tokens
are computed, and a sequence whose tokens are rewound (backtrack) copies a shared block it
would write into, or drops the registration of one it alone holds (BlockManager.shrink).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque
from collections.abc import Callable

import torch

BlockHash = bytes


def chain_hash(prev: BlockHash, token_ids: list[int]) -> BlockHash:
    """The hash of a full block whose predecessor hashes to `prev` (the content key for the
    first block). 128-bit BLAKE2b: a collision would hand a sequence another's K/V."""
    h = hashlib.blake2b(prev, digest_size=16)
    h.update(array("q", token_ids).tobytes())
    return h.digest()


def content_key(adapters: list[tuple[str, int, float]], vectors: list[tuple]) -> BlockHash:
    """What besides tokens decides a block's K/V: (adapter name, load generation, weight) and
    (vector name, coeff, layers, digest of the vector's values), in any order."""
    h = hashlib.blake2b(digest_size=16)
    h.update(repr((sorted(adapters), sorted(vectors, key=repr))).encode())
    return h.digest()


def vector_digest(vector: torch.Tensor) -> bytes:
    """A steering vector's values, hashed (a re-registered name gets another key)."""
    return hashlib.blake2b(vector.numpy().tobytes(), digest_size=16).digest()


class BlockPool:
    """Block ids 1..num_blocks-1 with reference counts; unreferenced blocks are either free
    (no content worth keeping) or cached (registered under a hash, reusable until evicted)."""

    def __init__(self, num_blocks: int, copy_block: Callable[[int, int], None] | None = None):
        self.free: deque[int] = deque(range(1, num_blocks))
        self.evictable: OrderedDict[int, None] = OrderedDict()  # least recently freed first
        self.refs = [0] * num_blocks
        self.hash_of: dict[int, BlockHash] = {}
        self.by_hash: dict[BlockHash, int] = {}
        self.copy_block = copy_block  # (src, dst): copy a block's K/V in every layer

    @property
    def num_free(self) -> int:
        return len(self.free) + len(self.evictable)

    def allocate(self) -> int:
        if self.free:
            block = self.free.popleft()
        else:
            block, _ = self.evictable.popitem(last=False)
            self.unregister(block)
        self.refs[block] = 1
        return block

    def take(self, block: int) -> None:
        """One more reference to a cached block."""
        if self.refs[block] == 0:
            del self.evictable[block]
        self.refs[block] += 1

    def drop(self, block: int) -> None:
        self.refs[block] -= 1
        if self.refs[block] == 0:
            if block in self.hash_of:
                self.evictable[block] = None
            else:
                self.free.append(block)

    def register(self, block: int, block_hash: BlockHash) -> None:
        """Offer a computed full block under its hash (kept private when another block
        already holds that content)."""
        if block_hash not in self.by_hash and block not in self.hash_of:
            self.by_hash[block_hash] = block
            self.hash_of[block] = block_hash

    def unregister(self, block: int) -> None:
        block_hash = self.hash_of.pop(block, None)
        if block_hash is not None:
            del self.by_hash[block_hash]

    def is_shared(self, block: int) -> bool:
        """Another sequence holds it, or it is registered (a later one may take it)."""
        return self.refs[block] > 1 or block in self.hash_of

    def lookup(self, hashes: list[BlockHash]) -> list[int]:
        """The registered blocks of the longest prefix of `hashes` (nothing taken yet)."""
        blocks = []
        for block_hash in hashes:
            block = self.by_hash.get(block_hash)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def cost(self, blocks: list[int]) -> int:
        """Free blocks that taking `blocks` uses up (those no sequence holds now)."""
        return sum(1 for b in blocks if self.refs[b] == 0)
