"""engine.block_manager: exact block ids, lowest free id first, growth, exhaustion, no leaks."""

from __future__ import annotations

import pytest

from engine.block_manager import BlockManager
from tests.engine.factories import make_block_manager


def assert_no_leak(bm: BlockManager) -> None:
    assert bm.num_free_blocks == bm.num_blocks
    assert sorted(bm.free_blocks) == list(range(bm.num_blocks))
    assert bm.ref_counts == [0] * bm.num_blocks
    assert bm.block_tables == {}


def test_new_pool_is_all_free_in_id_order():
    bm = make_block_manager(num_blocks=5, block_size=4)
    assert list(bm.free_blocks) == [0, 1, 2, 3, 4]
    assert (bm.num_free_blocks, bm.num_used_blocks) == (5, 0)


@pytest.mark.parametrize("num_blocks, block_size", [(0, 4), (4, 0), (-1, 16)])
def test_rejects_non_positive_sizes(num_blocks, block_size):
    with pytest.raises(ValueError):
        BlockManager(num_blocks, block_size)


@pytest.mark.parametrize("num_tokens, expected", [(0, 0), (1, 1), (4, 1), (5, 2), (8, 2), (9, 3)])
def test_blocks_for_rounds_up_to_whole_blocks(num_tokens, expected):
    assert make_block_manager(block_size=4).blocks_for(num_tokens) == expected


def test_allocate_hands_out_lowest_free_ids_in_order():
    bm = make_block_manager(num_blocks=8, block_size=4)
    assert bm.allocate(10, 5) == [0, 1]
    assert bm.allocate(11, 4) == [2]
    assert bm.allocate(12, 9) == [3, 4, 5]
    assert sorted(bm.free_blocks) == [6, 7]
    assert bm.ref_counts == [1, 1, 1, 1, 1, 1, 0, 0]
    assert (bm.num_free_blocks, bm.num_used_blocks) == (2, 6)


def test_table_grows_by_one_block_per_block_size_tokens():
    bm = make_block_manager(num_blocks=8, block_size=4)
    other = 99
    tables = []
    for num_tokens in range(1, 14):
        tables.append(list(bm.allocate(7, num_tokens)))
        if num_tokens == 6:
            bm.allocate(other, 1)
    assert tables[0:4] == [[0]] * 4
    assert tables[4:8] == [[0, 1]] * 4
    assert tables[8:12] == [[0, 1, 3]] * 4
    assert tables[12] == [0, 1, 3, 4]
    assert bm.block_tables == {7: [0, 1, 3, 4], other: [2]}


def test_allocate_returns_the_live_table_and_never_shrinks_it():
    bm = make_block_manager(block_size=4)
    table = bm.allocate(0, 9)
    assert bm.allocate(0, 2) is table
    assert table == [0, 1, 2]
    assert bm.num_free_blocks == 5


def test_num_missing_blocks_and_can_allocate():
    bm = make_block_manager(num_blocks=4, block_size=4)
    assert bm.num_missing_blocks(0, 9) == 3
    bm.allocate(0, 5)
    assert bm.num_missing_blocks(0, 5) == 0
    assert bm.num_missing_blocks(0, 8) == 0
    assert bm.num_missing_blocks(0, 9) == 1
    assert bm.num_missing_blocks(0, 3) == 0
    assert bm.can_allocate(0, 16)
    assert not bm.can_allocate(0, 17)
    assert bm.can_allocate(1, 8)
    assert not bm.can_allocate(1, 9)


def test_allocate_beyond_free_blocks_raises_and_changes_nothing():
    bm = make_block_manager(num_blocks=4, block_size=4)
    bm.allocate(0, 8)
    with pytest.raises(MemoryError):
        bm.allocate(1, 9)
    with pytest.raises(MemoryError):
        bm.allocate(0, 17)
    assert bm.block_tables == {0: [0, 1]}
    assert sorted(bm.free_blocks) == [2, 3]
    assert bm.ref_counts == [1, 1, 0, 0]


def test_freed_blocks_are_reused_lowest_id_first():
    bm = make_block_manager(num_blocks=6, block_size=4)
    bm.allocate(0, 8)
    bm.allocate(1, 4)
    bm.allocate(2, 5)
    bm.free(0)
    assert sorted(bm.free_blocks) == [0, 1, 5]
    bm.free(2)
    assert sorted(bm.free_blocks) == [0, 1, 3, 4, 5]
    assert bm.ref_counts == [0, 0, 1, 0, 0, 0]
    assert bm.allocate(3, 9) == [0, 1, 3]  # blocks in use stay packed at the start of the pool
    assert bm.allocate(3, 13) == [0, 1, 3, 4]
    assert sorted(bm.free_blocks) == [5]


def test_free_of_unknown_sequence_is_a_noop():
    bm = make_block_manager(num_blocks=4, block_size=4)
    bm.allocate(0, 5)
    bm.free(42)
    assert bm.block_tables == {0: [0, 1]}
    assert sorted(bm.free_blocks) == [2, 3]
    assert bm.ref_counts == [1, 1, 0, 0]


def test_double_free_does_not_duplicate_blocks():
    bm = make_block_manager(num_blocks=4, block_size=4)
    bm.allocate(0, 5)
    bm.free(0)
    bm.free(0)
    assert sorted(bm.free_blocks) == [0, 1, 2, 3]
    assert_no_leak(bm)


def test_no_block_leaked_after_every_sequence_is_freed():
    bm = make_block_manager(num_blocks=8, block_size=4)
    for step in range(1, 4):
        for seq_id in range(3):
            bm.allocate(seq_id, step * (seq_id + 1))
    bm.free(1)
    bm.allocate(3, 7)
    for seq_id in (0, 2, 3):
        bm.free(seq_id)
    assert_no_leak(bm)


def test_fork_shares_full_blocks_and_copies_a_partial_last_block():
    bm = make_block_manager(num_blocks=8, block_size=4)
    bm.allocate(0, 10)  # blocks 0, 1 full; block 2 holds 2 of 4 tokens
    copy = bm.fork(0, 1, 10)
    assert copy == (2, 3)
    assert bm.block_tables[1] == [0, 1, 3]
    assert bm.ref_counts[:4] == [2, 2, 1, 1]
    bm.free(0)
    assert bm.ref_counts[:4] == [1, 1, 0, 1]
    assert sorted(bm.free_blocks) == [2, 4, 5, 6, 7]
    bm.free(1)
    assert bm.num_free_blocks == 8 and not any(bm.ref_counts)


def test_fork_of_whole_blocks_copies_nothing():
    bm = make_block_manager(num_blocks=4, block_size=4)
    bm.allocate(0, 8)
    assert bm.fork(0, 1, 8) is None
    assert bm.block_tables[1] == [0, 1]
    assert bm.num_free_blocks == 2


def test_fork_without_a_free_block_for_the_copy_raises_and_changes_nothing():
    bm = make_block_manager(num_blocks=2, block_size=4)
    bm.allocate(0, 5)
    with pytest.raises(MemoryError):
        bm.fork(0, 1, 5)
    assert bm.ref_counts == [1, 1] and 1 not in bm.block_tables


# -- prefix caching -------------------------------------------------------------------------

PROMPT = list(range(100, 110))  # 10 tokens: blocks of 4, 4 and 2


def cached_pool(num_blocks: int = 8) -> BlockManager:
    """A pool where sequence 0 has computed PROMPT and finished: blocks 0 and 1 cached, free."""
    bm = make_block_manager(num_blocks=num_blocks, block_size=4, prefix_caching=True)
    bm.allocate(0, 10)
    bm.cache_blocks(0, PROMPT, 10)
    bm.free(0)
    return bm


def test_full_computed_blocks_are_cached_and_stay_evictable_after_free():
    bm = make_block_manager(num_blocks=8, block_size=4, prefix_caching=True)
    bm.allocate(0, 10)
    bm.cache_blocks(0, PROMPT, 7)  # only block 0 is full and computed
    assert bm.match_prefix(PROMPT) == [0]
    bm.cache_blocks(0, PROMPT, 10)  # block 1 too; block 2 holds 2 tokens and never counts
    assert bm.match_prefix(PROMPT) == [0, 1]
    bm.free(0)
    assert list(bm.evictable) == [1, 0]  # the tail first: a prefix outlives what follows it
    assert sorted(bm.free_blocks) == [2, 3, 4, 5, 6, 7]
    assert (bm.num_free_blocks, bm.num_used_blocks) == (8, 0)
    assert bm.match_prefix(PROMPT) == [0, 1]


def test_match_leaves_the_last_token_to_compute_and_stops_at_the_first_difference():
    bm = cached_pool()
    assert bm.match_prefix(PROMPT[:8]) == [0]  # 8 tokens: the second block would cover the last
    assert bm.match_prefix(PROMPT[:9]) == [0, 1]
    assert bm.match_prefix(PROMPT[:4] + [1, 2, 3, 4, 5]) == [0]
    assert bm.match_prefix([7] + PROMPT[1:]) == []


def test_a_block_matches_only_after_the_same_prefix():
    bm = cached_pool()
    moved = PROMPT[4:8] + PROMPT[4:8] + [1]  # block 1's tokens, but first in the prompt
    assert bm.match_prefix(moved) == []


def test_adopted_blocks_leave_the_free_pool_and_are_shared():
    bm = cached_pool()
    hit = bm.match_prefix(PROMPT + [5, 6])
    assert hit == [0, 1] and bm.num_evictable(hit) == 2
    bm.adopt(1, hit)
    bm.allocate(1, 12)
    assert bm.block_tables[1] == [0, 1, 2]
    assert bm.num_free_blocks == 5 and not bm.evictable
    bm.adopt(2, bm.match_prefix(PROMPT))  # a second holder: nothing more leaves the pool
    assert bm.ref_counts[:3] == [2, 2, 1] and bm.num_free_blocks == 5
    with pytest.raises(ValueError):
        bm.adopt(1, [0])


def test_allocation_takes_uncached_blocks_first_then_evicts_the_oldest_released():
    bm = cached_pool(num_blocks=4)  # blocks 0, 1 cached; 2, 3 free
    assert bm.allocate(5, 8) == [2, 3]
    assert bm.allocate(6, 4) == [1]  # evicted: released last-block-first, so block 1 before 0
    assert bm.match_prefix(PROMPT) == [0]
    assert bm.allocate(6, 8) == [1, 0]
    assert bm.match_prefix(PROMPT) == []
    assert bm.num_free_blocks == 0


def test_a_duplicate_block_stays_uncached_and_the_chain_goes_on_through_the_first():
    bm = make_block_manager(num_blocks=8, block_size=4, prefix_caching=True)
    bm.allocate(0, 10)
    bm.allocate(1, 10)  # the same prompt computed twice in one step
    bm.cache_blocks(0, PROMPT, 10)
    bm.cache_blocks(1, PROMPT + [1, 2, 3], 12)  # its blocks 3 and 4 repeat 0 and 1; 5 is new
    assert bm.match_prefix(PROMPT + [1, 2, 3, 9]) == [0, 1, 5]
    bm.free(1)
    assert list(bm.evictable) == [5] and 3 in bm.free_blocks and 4 in bm.free_blocks


def test_fork_carries_the_cached_chain():
    bm = make_block_manager(num_blocks=8, block_size=4, prefix_caching=True)
    bm.allocate(0, 10)
    bm.cache_blocks(0, PROMPT, 10)
    bm.fork(0, 1, 10)
    bm.allocate(1, 12)
    bm.cache_blocks(1, PROMPT + [7, 7], 12)  # the child's block 2 continues the parent's chain
    assert bm.match_prefix(PROMPT + [7, 7, 1]) == [0, 1, bm.block_tables[1][2]]


def test_without_prefix_caching_nothing_is_cached():
    bm = make_block_manager(num_blocks=8, block_size=4)
    bm.allocate(0, 10)
    bm.cache_blocks(0, PROMPT, 10)
    assert bm.match_prefix(PROMPT) == []
    bm.free(0)
    assert_no_leak(bm)


def test_every_block_returns_to_the_pool_with_prefix_caching():
    bm = cached_pool()
    bm.adopt(1, bm.match_prefix(PROMPT))
    bm.allocate(1, 14)
    bm.cache_blocks(1, PROMPT + [1, 2, 3, 4], 14)
    bm.free(1)
    assert bm.num_free_blocks == bm.num_blocks and bm.ref_counts == [0] * bm.num_blocks
    assert bm.block_tables == {} and sorted(bm.free_blocks + list(bm.evictable)) == list(range(8))
