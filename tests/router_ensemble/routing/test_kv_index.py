"""KvIndex: exact prefix overlaps, removal, tiers, worker removal, approximate-mode TTL."""

from __future__ import annotations

import pytest

from kv_manager.events import AllBlocksCleared, BlockRemoved, BlockStored
from kv_manager.hashing import hash_blocks
from router_ensemble.routing.index import KvIndex
from trident.core.errors import ConfigError

BS = 4
PROMPT = list(range(40))  # 10 full blocks
HASHES = hash_blocks(PROMPT, BS)
OTHER = hash_blocks(PROMPT[:8] + [999] * 32, BS)  # shares the first 2 blocks only


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def stored(hashes, medium: str | None = "GPU") -> BlockStored:
    return BlockStored(tuple(hashes), None, (), BS, None, medium)


def test_exact_overlaps() -> None:
    index = KvIndex()
    index.apply_event("a", stored(HASHES))
    index.apply_event("b", stored(HASHES[:5]))
    index.apply_event("c", stored(OTHER))
    assert OTHER[:2] == HASHES[:2] and OTHER[2] != HASHES[2]
    assert index.find_matches(HASHES) == {"a": 10, "b": 5, "c": 2}
    assert index.find_matches(OTHER) == {"a": 2, "b": 2, "c": 10}
    assert index.find_matches(HASHES[:3]) == {"a": 3, "b": 3, "c": 2}
    assert index.find_matches(hash_blocks([7] * 40, BS)) == {}
    assert index.find_matches([]) == {}


def test_candidates_limit_the_answer() -> None:
    index = KvIndex()
    index.apply_event("a", stored(HASHES))
    index.apply_event("b", stored(HASHES[:5]))
    assert index.find_matches(HASHES, candidates=["b", "zz"]) == {"b": 5}
    assert index.find_matches(HASHES, candidates=[]) == {}


def test_a_hole_ends_the_prefix() -> None:
    index = KvIndex()
    index.apply_event("a", stored(HASHES[:3] + HASHES[4:]))
    assert index.find_matches(HASHES) == {"a": 3}


def test_removal_and_clear_touch_only_their_worker() -> None:
    index = KvIndex()
    index.apply_event("a", stored(HASHES))
    index.apply_event("b", stored(HASHES))
    index.apply_event("a", BlockRemoved(tuple(HASHES[6:]), "GPU"))
    assert index.find_matches(HASHES) == {"a": 6, "b": 10}
    index.apply_event("b", AllBlocksCleared())
    assert index.find_matches(HASHES) == {"a": 6}
    assert index.num_blocks("b") == 0 and index.num_blocks("a") == 6
    assert index.num_blocks() == 6  # no orphan hashes left behind
    index.apply_event("a", BlockRemoved((12345,), "GPU"))  # unknown hash: no effect
    assert index.num_blocks("a") == 6


def test_block_stays_while_any_tier_holds_it() -> None:
    index = KvIndex()
    index.apply_events("a", [stored(HASHES, "GPU"), stored(HASHES[:4], "CPU")])
    index.apply_event("a", BlockRemoved(tuple(HASHES), "GPU"))  # evicted to CPU
    assert index.find_matches(HASHES) == {"a": 4}
    index.apply_event("a", BlockRemoved(tuple(HASHES[2:4]), "CPU"))
    assert index.find_matches(HASHES) == {"a": 2}
    index.apply_event("a", stored(HASHES[:3], None))  # no medium = GPU
    index.apply_event("a", BlockRemoved(tuple(HASHES[:3]), "GPU"))
    assert index.find_matches(HASHES) == {"a": 2}


def test_remove_worker() -> None:
    index = KvIndex()
    index.apply_event("a", stored(HASHES))
    index.apply_event("b", stored(HASHES[:3]))
    assert index.remove_worker("a") == 10
    assert index.find_matches(HASHES) == {"b": 3}
    assert index.workers() == ["b"]
    assert index.num_blocks() == 3
    assert index.remove_worker("a") == 0
    index.remove_worker("b")
    assert index.num_blocks() == 0 and index.find_matches(HASHES) == {}


def test_approximate_mode_expires_after_ttl() -> None:
    clock = FakeClock()
    index = KvIndex(approximate=True, ttl_s=10.0, clock=clock)
    index.assume_cached("a", HASHES)
    index.assume_cached("b", HASHES[:4])
    clock.now += 5
    index.assume_cached("b", HASHES[:2])  # refreshed: lives until now + 10
    index.apply_event("c", stored(HASHES[:3]))  # from events: never expires
    assert index.find_matches(HASHES) == {"a": 10, "b": 4, "c": 3}
    clock.now += 5.01
    assert index.find_matches(HASHES) == {"b": 2, "c": 3}
    assert index.num_blocks("a") == 0
    clock.now += 5
    assert index.find_matches(HASHES) == {"c": 3}
    assert index.prune() == 0


def test_approximate_entries_survive_worker_churn() -> None:
    clock = FakeClock()
    index = KvIndex(approximate=True, ttl_s=1.0, clock=clock)
    index.assume_cached("a", HASHES)
    index.remove_worker("a")
    index.assume_cached("a", HASHES[:2])
    clock.now += 2
    assert index.prune() == 2
    assert index.num_blocks() == 0


def test_bad_ttl() -> None:
    with pytest.raises(ConfigError, match="approx_ttl_s"):
        KvIndex(approximate=True, ttl_s=0)
