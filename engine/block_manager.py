"""Paged KV bookkeeping: which cache blocks each sequence owns (pure Python), and which full
blocks hold a known run of tokens that a later prompt can reuse (prefix caching)."""

from __future__ import annotations

import heapq
import itertools
from collections import OrderedDict

# A cached block's key: (the key id of the block before it, or ROOT, its tokens). Chaining the
# ids makes a key name the whole prefix up to the block's end, and the dict compares the
# tokens themselves, so a lookup never returns another prefix's keys and values.
ROOT = -1
BlockKey = tuple[int, tuple[int, ...]]


class BlockManager:
    """A pool of `num_blocks` fixed-size blocks, handed out lowest id first.

    Taking the lowest free id keeps the blocks in use packed at the start of the pool however
    requests come and go, so attention reads them from few memory pages: with blocks scattered
    over the pool (a FIFO free list after a while of serving), a 16-sequence decode step of
    SmolLM2 took 15% longer.

    With prefix caching, a full block whose tokens have all been computed is registered under
    its prefix (`cache_blocks`). When no table holds it any more it stays cached but
    evictable: a new prompt starting with the same tokens takes it back (`match_prefix`,
    `adopt`), and allocation takes never-cached free blocks first, then evicts the cached block
    released longest ago.

    Invariants: a block is either free (ref count 0: in `free_blocks`, or evictable if cached)
    or held by block tables (ref count = number of tables holding it); a table of a sequence
    with n tokens in the cache holds exactly ceil(n / block_size) blocks once `allocate` has
    run for it; a cached block's tokens never change while it is cached.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.free_blocks: list[int] = list(range(num_blocks))  # a heap of never-cached free blocks
        self.evictable: OrderedDict[int, None] = OrderedDict()  # cached, unreferenced; oldest first
        self.ref_counts = [0] * num_blocks
        self.block_tables: dict[int, list[int]] = {}
        self._cached: dict[BlockKey, tuple[int, int]] = {}  # key -> (block, key id)
        self._key_of_block: dict[int, BlockKey] = {}
        self._key_ids = itertools.count()
        self._chains: dict[int, list[int]] = {}  # seq_id -> key ids of its cached full blocks

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks) + len(self.evictable)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def num_missing_blocks(self, seq_id: int, num_tokens: int) -> int:
        """Blocks `seq_id` still needs for its cache to hold `num_tokens` tokens."""
        have = len(self.block_tables.get(seq_id, ()))
        return max(0, self.blocks_for(num_tokens) - have)

    def can_allocate(self, seq_id: int, num_tokens: int) -> bool:
        return self.num_missing_blocks(seq_id, num_tokens) <= self.num_free_blocks

    def allocate(self, seq_id: int, num_tokens: int) -> list[int]:
        """Grow `seq_id`'s table to hold `num_tokens` tokens; returns the table."""
        missing = self.num_missing_blocks(seq_id, num_tokens)
        if missing > self.num_free_blocks:
            raise MemoryError(f"need {missing} KV blocks, {self.num_free_blocks} free")
        table = self.block_tables.setdefault(seq_id, [])
        for _ in range(missing):
            table.append(self._take_free_block())
        return table

    def fork(self, parent_id: int, child_id: int, num_tokens: int) -> tuple[int, int] | None:
        """Give `child_id` the parent's first `num_tokens` tokens of cache.

        Full blocks are shared (their ref count grows); a partly filled last block is one the
        parent will still write into, so the child gets a fresh block instead, and the returned
        (source, destination) pair says which block contents the caller must copy.
        """
        parent = self.block_tables[parent_id][: self.blocks_for(num_tokens)]
        num_full = num_tokens // self.block_size
        partial = len(parent) > num_full
        if partial and not self.num_free_blocks:
            raise MemoryError("no free KV block for a forked sequence")
        table = parent[:num_full]
        for block in table:
            self.ref_counts[block] += 1
        copy = None
        if partial:
            block = self._take_free_block()
            table.append(block)
            copy = (parent[-1], block)
        self.block_tables[child_id] = table
        if parent_id in self._chains:
            self._chains[child_id] = self._chains[parent_id][:num_full]
        return copy

    def free(self, seq_id: int) -> None:
        """Release every block of `seq_id`. A block no other table holds becomes free, or
        evictable if cached: last blocks first, so a prefix outlives the blocks after it."""
        self._chains.pop(seq_id, None)
        for block in reversed(self.block_tables.pop(seq_id, ())):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                if block in self._key_of_block:
                    self.evictable[block] = None
                else:
                    heapq.heappush(self.free_blocks, block)

    # -- prefix caching -----------------------------------------------------------------------

    def match_prefix(self, token_ids: list[int]) -> list[int]:
        """Cached blocks holding the longest run of whole blocks at the start of `token_ids`,
        leaving at least its last token uncovered (its logits are still to be computed)."""
        if not self.enable_prefix_caching:
            return []
        blocks, parent, size = [], ROOT, self.block_size
        for start in range(0, len(token_ids) - size, size):
            hit = self._cached.get((parent, tuple(token_ids[start : start + size])))
            if hit is None:
                break
            block, parent = hit
            blocks.append(block)
        return blocks

    def num_evictable(self, blocks: list[int]) -> int:
        """How many of `blocks` (from match_prefix) are free now: adopting them uses them up."""
        return sum(self.ref_counts[b] == 0 for b in blocks)

    def adopt(self, seq_id: int, blocks: list[int]) -> None:
        """Start `seq_id`'s (empty) table with cached blocks from match_prefix."""
        if self.block_tables.get(seq_id):
            raise ValueError(f"sequence {seq_id} already holds blocks")
        for block in blocks:
            if self.ref_counts[block] == 0:
                del self.evictable[block]
            self.ref_counts[block] += 1
        self.block_tables[seq_id] = list(blocks)
        self._chains[seq_id] = [self._cached[self._key_of_block[b]][1] for b in blocks]

    def cache_blocks(self, seq_id: int, token_ids: list[int], num_computed_tokens: int) -> None:
        """Register `seq_id`'s full blocks whose keys and values are all computed (tokens
        [0, num_computed_tokens) of `token_ids`). A block whose prefix another block already
        holds stays uncached, and the chain goes on through the other one."""
        if not self.enable_prefix_caching:
            return
        table, size = self.block_tables[seq_id], self.block_size
        chain = self._chains.setdefault(seq_id, [])
        for i in range(len(chain), num_computed_tokens // size):
            key = (chain[-1] if chain else ROOT, tuple(token_ids[i * size : (i + 1) * size]))
            hit = self._cached.get(key)
            if hit is None:
                hit = (table[i], next(self._key_ids))
                self._cached[key] = hit
                self._key_of_block[table[i]] = key
            chain.append(hit[1])

    def _take_free_block(self) -> int:
        if self.free_blocks:
            block = heapq.heappop(self.free_blocks)
        else:  # evict the cached block released longest ago
            block, _ = self.evictable.popitem(last=False)
            del self._cached[self._key_of_block.pop(block)]
        self.ref_counts[block] = 1
        return block
