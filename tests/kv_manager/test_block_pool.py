from __future__ import annotations

import pytest

from kv_manager.block_pool import BlockPool
from kv_manager.events import AllBlocksCleared, BlockRemoved, BlockStored
from kv_manager.hashing import hash_blocks


def _fill(pool: BlockPool, tokens: list[int]) -> list:
    """Allocate and cache the full blocks of `tokens`, as the scheduler does after compute."""
    bs = pool.block_size
    n = len(tokens) // bs
    blocks = pool.get_new_blocks(n)
    assert blocks is not None
    pool.cache_full_blocks(blocks, hash_blocks(tokens, bs), tokens[: n * bs], None)
    return blocks


def test_new_blocks_come_in_id_order_and_running_out_is_none():
    pool = BlockPool(num_blocks=4, block_size=2)
    blocks = pool.get_new_blocks(3)
    assert [b.block_id for b in blocks] == [0, 1, 2]
    assert pool.get_new_blocks(2) is None
    assert pool.num_free_blocks == 1
    assert [b.ref_count for b in blocks] == [1, 1, 1]


def test_freed_unhashed_blocks_are_reused_first_hashed_last():
    pool = BlockPool(num_blocks=4, block_size=2)
    cached = _fill(pool, [1, 2, 3, 4])  # blocks 0, 1 hashed
    plain = pool.get_new_blocks(2)  # blocks 2, 3 unhashed
    pool.free_blocks(cached)
    pool.free_blocks(plain)
    # unhashed to the front (in reverse so the request's first block is reused first),
    # hashed to the back with the request's tail evicted first.
    assert pool.free_queue.block_ids() == [2, 3, 1, 0]


def test_lru_eviction_order_and_removed_events():
    pool = BlockPool(num_blocks=4, block_size=2)
    a = _fill(pool, [1, 2, 3, 4])  # blocks 0,1
    b = _fill(pool, [9, 9, 8, 8])  # blocks 2,3
    pool.take_events()
    pool.free_blocks(a)
    pool.free_blocks(b)
    assert pool.free_queue.block_ids() == [1, 0, 3, 2]
    got = pool.get_new_blocks(3)
    assert [x.block_id for x in got] == [1, 0, 3]
    ha = hash_blocks([1, 2, 3, 4], 2)
    hb = hash_blocks([9, 9, 8, 8], 2)
    assert pool.take_events() == [BlockRemoved((ha[1],)), BlockRemoved((ha[0],)), BlockRemoved((hb[1],))]
    assert list(pool.cached) == [hb[0]]


def test_cache_hit_requires_equal_tokens_and_touch_takes_block_off_free_queue():
    pool = BlockPool(num_blocks=4, block_size=2)
    blocks = _fill(pool, [5, 6])
    pool.free_blocks(blocks)
    h = hash_blocks([5, 6], 2)[0]
    assert pool.get_cached_block(h, [5, 7]) is None  # a collision is a miss
    hit = pool.get_cached_block(h, [5, 6])
    assert hit is blocks[0]
    pool.touch([hit])
    assert hit.ref_count == 1 and 0 not in pool.free_queue.block_ids()
    pool.touch([hit])
    pool.free_blocks([hit])
    pool.free_blocks([hit])
    assert pool.num_free_blocks == 4
    with pytest.raises(RuntimeError, match="freed twice"):
        pool.free_blocks([hit])


def test_stored_event_carries_chain_parent_and_tokens():
    pool = BlockPool(num_blocks=8, block_size=2)
    tokens = [1, 2, 3, 4, 5, 6]
    blocks = pool.get_new_blocks(3)
    hashes = hash_blocks(tokens, 2)
    pool.cache_full_blocks(blocks[:1], hashes[:1], tokens[:2], None)
    pool.cache_full_blocks(blocks[1:], hashes[1:], tokens[2:], hashes[0])
    assert pool.take_events() == [
        BlockStored((hashes[0],), None, (1, 2), 2),
        BlockStored((hashes[1], hashes[2]), hashes[0], (3, 4, 5, 6), 2),
    ]
    assert pool.take_events() == []


def test_duplicate_content_keeps_first_copy_and_reset_clears():
    pool = BlockPool(num_blocks=4, block_size=2)
    a = _fill(pool, [1, 2])
    b = _fill(pool, [1, 2])
    assert pool.cached[hash_blocks([1, 2], 2)[0]] is a[0]
    assert b[0].block_hash is None
    assert not pool.reset_prefix_cache()  # blocks in use
    pool.free_blocks(a + b)
    pool.take_events()
    assert pool.reset_prefix_cache()
    assert pool.cached == {} and pool.take_events() == [AllBlocksCleared()]


def test_caching_disabled_stores_nothing():
    pool = BlockPool(num_blocks=2, block_size=2, enable_caching=False)
    blocks = _fill(pool, [1, 2, 3, 4])
    assert pool.cached == {} and pool.take_events() == []
    pool.free_blocks(blocks)
    assert pool.num_free_blocks == 2
