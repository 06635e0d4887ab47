"""KVCacheManager on tiny pools: prefix match, allocation, caching, freeing, eviction order
and the two-phase external load, with exact block ids."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from kv_manager.block_pool import Block, BlockPool
from kv_manager.events import BlockRemoved, BlockStored
from kv_manager.hashing import BlockHash, hash_blocks
from kv_manager.kv_cache_manager import KVCacheManager, KVLoad, LoadDone, ThreadedKVLoader


@dataclass(eq=False)
class Req:
    """The smallest `KVRequest`."""

    request_id: str
    token_ids: list[int]
    block_table: list[Block] = field(default_factory=list)
    num_computed: int = 0
    num_cached_blocks: int = 0

    def hashes_upto(self, num_blocks: int, block_size: int) -> list[BlockHash]:
        return hash_blocks(self.token_ids, block_size)[:num_blocks]


class FakeLoader:
    """Records starts; the test decides when each load ends."""

    def __init__(self) -> None:
        self.started: list[KVLoad] = []
        self.done: list[LoadDone] = []
        self.closed = False

    def start_load(self, load: KVLoad) -> None:
        self.started.append(load)

    def finish(self, load: KVLoad, error: Exception | None = None) -> None:
        self.done.append(LoadDone(load.load_id, error))

    def poll_finished(self) -> list[LoadDone]:
        done, self.done = self.done, []
        return done

    def close(self) -> None:
        self.closed = True


def _ids(blocks) -> list[int]:
    return [b.block_id for b in blocks]


def _computed(kv: KVCacheManager, rid: str, tokens: list[int]) -> Req:
    """A request whose tokens are all computed and whose full blocks are cached."""
    req = Req(rid, tokens)
    assert kv.allocate_slots(req, len(tokens)) is not None
    req.num_computed = len(tokens)
    kv.cache_blocks(req, len(tokens) // kv.block_size)
    return req


def test_allocate_slots_gives_exact_blocks_and_none_when_short():
    pool = BlockPool(5, 4)
    kv = KVCacheManager(pool)
    a, b = Req("a", list(range(6))), Req("b", list(range(9)))
    assert _ids(kv.allocate_slots(a, 6)) == [0, 1]
    assert _ids(kv.allocate_slots(b, 9)) == [2, 3, 4]
    a.num_computed = 6
    assert kv.allocate_slots(a, 2) == []  # 8 tokens still fit in two blocks
    assert kv.allocate_slots(a, 3) is None  # a third block: the pool is empty
    assert _ids(a.block_table) == [0, 1] and pool.num_free_blocks == 0
    kv.free(b)
    assert b.block_table == [] and _ids(kv.allocate_slots(a, 3)) == [2]


def test_prefix_match_stops_at_the_first_miss_and_within_num_tokens():
    kv = KVCacheManager(BlockPool(8, 4))
    first = _computed(kv, "a", list(range(100, 112)))  # blocks 0, 1, 2 cached
    kv.free(first)
    same = Req("b", list(range(100, 112)))
    assert _ids(kv.get_computed_blocks(same, 12)) == [0, 1, 2]
    assert _ids(kv.get_computed_blocks(same, 11)) == [0, 1]  # leave the last token to compute
    fork = Req("c", [*range(100, 104), 7, 7, 7, 7, *range(108, 112)])
    assert _ids(kv.get_computed_blocks(fork, 12)) == [0]  # chained: a miss ends the match
    assert kv.get_computed_blocks(Req("d", [1, 2, 3]), 3) == []
    assert KVCacheManager(BlockPool(8, 4, enable_caching=False)).get_computed_blocks(same, 12) == []


def test_hits_are_referenced_and_new_blocks_follow_them():
    pool = BlockPool(8, 4)
    kv = KVCacheManager(pool)
    kv.free(_computed(kv, "a", list(range(8))))  # free queue: [2..7, 1, 0]
    req = Req("b", [*range(8), 50, 51])
    hits = kv.get_computed_blocks(req, 9)
    new = kv.allocate_slots(req, 2, hits)
    assert _ids(hits) == [0, 1] and _ids(new) == [2]
    assert _ids(req.block_table) == [0, 1, 2] and [b.ref_count for b in req.block_table] == [1, 1, 1]
    assert pool.free_queue.block_ids() == [3, 4, 5, 6, 7]


def test_free_hits_are_not_counted_as_free_for_new_blocks():
    pool = BlockPool(3, 4)
    kv = KVCacheManager(pool)
    kv.free(_computed(kv, "a", list(range(8))))  # 3 free blocks, two of them the cached prefix
    req = Req("b", [*range(8), *range(20, 28)])
    hits = kv.get_computed_blocks(req, 15)
    assert _ids(hits) == [0, 1]
    assert kv.allocate_slots(req, 8, hits) is None  # needs 2 new blocks, only block 2 is spare
    assert req.block_table == [] and [b.ref_count for b in hits] == [0, 0]
    assert _ids(kv.get_computed_blocks(req, 15)) == [0, 1]  # nothing was evicted
    assert _ids(kv.allocate_slots(req, 4, hits)) == [2]


def test_cache_blocks_registers_only_new_full_blocks_and_records_events():
    pool = BlockPool(8, 4)
    kv = KVCacheManager(pool)
    req = Req("a", list(range(10)))
    kv.allocate_slots(req, 10)
    kv.cache_blocks(req, 1)
    kv.cache_blocks(req, 1)  # no-op
    kv.cache_blocks(req, 2)
    h = hash_blocks(req.token_ids, 4)
    assert req.num_cached_blocks == 2 and kv.num_cached_blocks == 2
    assert kv.take_events() == [
        BlockStored((h[0],), None, (0, 1, 2, 3), 4),
        BlockStored((h[1],), h[0], (4, 5, 6, 7), 4),
    ]


def test_eviction_takes_unhashed_first_then_the_least_recently_freed_tail():
    pool = BlockPool(6, 2)
    kv = KVCacheManager(pool)
    a = _computed(kv, "a", [1, 2, 3, 4])  # blocks 0, 1
    b = _computed(kv, "b", [5, 6, 7, 8])  # blocks 2, 3
    c = Req("c", [9, 9, 9])
    kv.allocate_slots(c, 3)  # blocks 4, 5, never cached
    kv.take_events()
    kv.free(a)
    kv.free(b)
    kv.free(c)
    assert pool.free_queue.block_ids() == [4, 5, 1, 0, 3, 2]
    d = Req("d", list(range(40, 48)))
    assert _ids(kv.allocate_slots(d, 8)) == [4, 5, 1, 0]
    ha, hb = hash_blocks([1, 2, 3, 4], 2), hash_blocks([5, 6, 7, 8], 2)
    assert kv.take_events() == [BlockRemoved((ha[1],)), BlockRemoved((ha[0],))]
    assert kv.get_computed_blocks(Req("e", [1, 2, 3, 4]), 4) == []
    assert _ids(kv.get_computed_blocks(Req("f", [5, 6, 7, 8]), 4)) == [2, 3]
    assert kv.num_cached_blocks == 2 and hb[0] in pool.cached


def test_external_load_reserves_blocks_and_reports_once():
    pool = BlockPool(8, 4)
    loader = FakeLoader()
    kv = KVCacheManager(pool, loader)
    kv.free(_computed(kv, "a", list(range(8))))
    req = Req("b", [*range(8), *range(30, 34), 60])  # a 13-token prompt, two blocks cached
    hits = kv.get_computed_blocks(req, 13)
    new = kv.allocate_slots(req, 0, hits, num_external_computed_tokens=13 - 8)
    assert _ids(hits) == [0, 1] and _ids(new) == [2, 3]  # ceil(13 / 4) - 2 blocks to load
    kv.start_load(req, b"peer", 13, skip_blocks=2)
    assert loader.started == [KVLoad(0, "b", b"peer", 13, 2, (2, 3))]
    assert kv.finished_loads() == [] and kv.has_loads()
    loader.finish(loader.started[0])
    assert kv.finished_loads() == [(req, None)]
    assert kv.finished_loads() == [] and not kv.has_loads()
    assert _ids(req.block_table) == [0, 1, 2, 3] and pool.num_used_blocks == 4


def test_failed_load_frees_its_blocks_before_it_is_reported():
    pool = BlockPool(8, 4)
    loader = FakeLoader()
    kv = KVCacheManager(pool, loader)
    req = Req("b", list(range(5)))
    kv.allocate_slots(req, 0, num_external_computed_tokens=5)
    kv.start_load(req, b"peer", 5, 0)
    err = ValueError("bad descriptor")
    loader.finish(loader.started[0], err)
    assert kv.finished_loads() == [(req, err)]
    assert req.block_table == [] and pool.num_used_blocks == 0
    assert pool.free_queue.block_ids()[:2] == [0, 1]


def test_load_that_cannot_start_is_reported_as_failed():
    kv = KVCacheManager(BlockPool(4, 4))  # no loader
    req = Req("b", list(range(5)))
    kv.allocate_slots(req, 0, num_external_computed_tokens=5)
    kv.start_load(req, b"peer", 5, 0)
    [(got, err)] = kv.finished_loads()
    assert got is req and "no KV loader" in str(err) and kv.num_used_blocks == 0


def test_free_during_a_load_waits_for_the_load_then_frees_once():
    pool = BlockPool(4, 4)
    loader = FakeLoader()
    kv = KVCacheManager(pool, loader)
    req = Req("b", list(range(5)))
    kv.allocate_slots(req, 0, num_external_computed_tokens=5)
    kv.start_load(req, b"peer", 5, 0)
    kv.free(req)
    kv.free(req)  # a second free has nothing left to give back
    assert req.block_table == [] and pool.num_used_blocks == 2
    other = Req("c", list(range(8)))
    assert _ids(kv.allocate_slots(other, 8)) == [2, 3]  # 0 and 1 may still be written
    loader.finish(loader.started[0], ValueError("late failure"))
    assert kv.finished_loads() == []  # nobody waits for an abandoned load
    assert pool.num_used_blocks == 2 and pool.free_queue.block_ids() == [0, 1]


def test_lend_and_take_back():
    pool = BlockPool(4, 4)
    kv = KVCacheManager(pool)
    req = Req("a", list(range(9)))
    kv.allocate_slots(req, 9)
    assert kv.lend(req, 2) == [0, 1] and _ids(req.block_table) == [2]
    kv.free(req)
    assert pool.num_used_blocks == 2  # the lease keeps its blocks
    kv.take_back([0, 1])
    assert pool.num_used_blocks == 0


def test_threaded_loader_runs_loads_in_order_on_one_thread_and_close_waits():
    gate = threading.Event()
    seen: list[tuple[int, str]] = []

    def load_fn(load: KVLoad) -> None:
        gate.wait(10)
        seen.append((load.load_id, threading.current_thread().name))
        if load.load_id == 1:
            raise ValueError("peer gone")

    pool = BlockPool(8, 4)
    loader = ThreadedKVLoader(load_fn, name="kv-test")
    kv = KVCacheManager(pool, loader)
    reqs = [Req(f"r{i}", list(range(5))) for i in range(3)]
    for req in reqs:
        kv.allocate_slots(req, 0, num_external_computed_tokens=5)
        kv.start_load(req, b"peer", 5, 0)
    kv.free(reqs[2])  # abandoned mid-load
    assert pool.num_used_blocks == 6
    threading.Timer(0.05, gate.set).start()
    kv.close()  # waits for all three, then frees what nobody will use
    assert [i for i, _ in seen] == [0, 1, 2] and len({name for _, name in seen}) == 1
    assert seen[0][1].startswith("kv-test")
    assert pool.num_used_blocks == 0 and not kv.has_loads()
    kv.close()  # idempotent
    kv.start_load(reqs[0], b"peer", 5, 0)  # after close: reported as failed, not raised
    assert "closed" in str(kv.finished_loads()[0][1])
