"""KvIndex: exact prefix overlaps, removal, tiers and their weights, worker removal,
approximate-mode TTL; every test on both owner backends (the C table and the dict)."""

from __future__ import annotations

import random

import pytest

from kv_manager.events import AllBlocksCleared, BlockRemoved, BlockStored
from kv_manager.hashing import hash_blocks
from router_ensemble.routing import index as index_module
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


def removed(hashes, medium: str | None = "GPU") -> BlockRemoved:
    return BlockRemoved(tuple(hashes), medium)


@pytest.fixture(autouse=True, params=["table", "dict"])
def owners_backend(request, monkeypatch):
    """Run each test with the C owner table (where built) and with the dict fallback."""
    if request.param == "dict":
        monkeypatch.setattr(index_module, "OwnerTable", None)
    elif index_module.OwnerTable is None:
        pytest.skip("router_ensemble.routing._owners not built")
    return request.param


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


# ---------------------------------------------------------------- tiers and their weights


def test_backend_in_use(owners_backend) -> None:
    assert KvIndex().native == (owners_backend == "table")


def test_weighted_overlaps_are_exact_for_mixed_tiers() -> None:
    index = KvIndex()  # Dynamo's defaults: host 0.75, disk 0.25
    index.apply_events(
        "mixed",
        [
            stored(HASHES[:4], "GPU"),
            stored(HASHES[4:6], "CPU"),
            stored(HASHES[6:8], "DISK"),
            stored(HASHES[8:9], "CPU"),
            stored(HASHES[8:10], "DISK"),  # block 8: host and disk, block 9: disk
            stored(HASHES[9:10], "GPU"),  # block 9 also on the device
        ],
    )
    index.apply_event("device", stored(HASHES))
    index.apply_event("disk", stored(HASHES[:5], "DISK"))
    index.apply_event("host", stored(HASHES[:3], "CPU"))
    depths, weighted = index.find_weighted_matches(HASHES)
    assert depths == index.find_matches(HASHES)
    assert depths == {"mixed": 10, "device": 10, "disk": 5, "host": 3}
    # the best tier holding each block decides: 4 x 1 + 2 x 0.75 + 2 x 0.25 + 0.75 + 1
    assert weighted == {"mixed": 7.75, "device": 10, "disk": 1.25, "host": 2.25}
    # only the matched prefix counts
    prefix = {"mixed": 5.5, "device": 6, "disk": 1.25, "host": 2.25}
    assert index.find_weighted_matches(HASHES[:6])[1] == prefix
    assert index.find_weighted_matches(HASHES, candidates=["disk"]) == ({"disk": 5}, {"disk": 1.25})
    assert index.find_weighted_matches([]) == ({}, {})


def test_removing_one_tier_keeps_the_other() -> None:
    index = KvIndex()
    index.apply_events("a", [stored(HASHES[:6], "GPU"), stored(HASHES[:6], "CPU")])  # write-through
    assert index.find_weighted_matches(HASHES) == ({"a": 6}, {"a": 6})
    index.apply_event("a", removed(HASHES[2:6], "GPU"))  # evicted from the device, kept on host
    assert index.find_weighted_matches(HASHES) == ({"a": 6}, {"a": 2 + 4 * 0.75})
    index.apply_event("a", stored(HASHES[4:6], "GPU"))  # onboarded again
    assert index.find_weighted_matches(HASHES) == ({"a": 6}, {"a": 4 + 2 * 0.75})
    # host copies gone: the device holds blocks 0-1 and 4-5
    index.apply_event("a", removed(HASHES[:6], "CPU"))
    assert index.find_weighted_matches(HASHES) == ({"a": 2}, {"a": 2})
    index.apply_event("a", removed(HASHES[:2], "GPU"))
    assert index.find_weighted_matches(HASHES) == ({}, {})
    assert index.num_blocks("a") == 2 and index.num_blocks() == 2  # blocks 4-5, unreachable


def test_tier_weights_are_config_and_unknown_media_count_as_disk() -> None:
    index = KvIndex(host_tier_weight=0.5, disk_tier_weight=0.0)
    index.apply_events("a", [stored(HASHES[:2], "GPU"), stored(HASHES[2:4], "CPU")])
    index.apply_events("a", [stored(HASHES[4:6], "DISK"), stored(HASHES[6:7], "NVME")])
    assert index.find_weighted_matches(HASHES) == ({"a": 7}, {"a": 2 + 1.0 + 0.0 + 0.0})
    defaults = KvIndex()
    defaults.apply_event("a", stored(HASHES[:4], "NVME"))
    assert defaults.find_weighted_matches(HASHES)[1] == {"a": 1.0}


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"host_tier_weight": -0.1}, "host_tier_weight"),
        ({"host_tier_weight": 1.5}, "host_tier_weight"),
        ({"disk_tier_weight": float("nan")}, "disk_tier_weight"),
        ({"disk_tier_weight": float("inf")}, "disk_tier_weight"),
    ],
)
def test_bad_tier_weights(kwargs, key) -> None:
    with pytest.raises(ConfigError, match=f"{key} must be between 0 and 1"):
        KvIndex(**kwargs)


def test_approximate_entries_count_as_device_hits() -> None:
    index = KvIndex(approximate=True)
    index.apply_event("a", stored(HASHES[:4], "DISK"))
    index.assume_cached("a", HASHES[:2])
    assert index.find_weighted_matches(HASHES) == ({"a": 4}, {"a": 2 + 2 * 0.25})


def test_weighted_matches_agree_with_a_model_under_churn() -> None:
    """Random stores and removals in every tier on 3 workers: the index's depths and weights
    equal those computed from a plain model (which tiers hold which block per worker)."""
    rng = random.Random(7)
    media = ["GPU", "CPU", "DISK"]
    weight = {"GPU": 1.0, "CPU": 0.75, "DISK": 0.25}
    prompts = [hash_blocks([p] * 8 + list(range(p, p + 40)), BS) for p in range(4)]
    model: dict[str, dict[int, set[str]]] = {w: {} for w in "abc"}
    index = KvIndex()
    for _ in range(400):
        worker, medium, prompt = rng.choice("abc"), rng.choice(media), rng.choice(prompts)
        lo = rng.randrange(len(prompt))
        hashes = prompt[lo : rng.randrange(lo, len(prompt)) + 1]
        held = model[worker]
        if rng.random() < 0.6:
            index.apply_event(worker, stored(hashes, medium))
            for h in hashes:
                held.setdefault(h, set()).add(medium)
        else:
            index.apply_event(worker, removed(hashes, medium))
            for h in hashes:
                if h in held:
                    held[h].discard(medium)
                    if not held[h]:
                        del held[h]
        for prompt in prompts:
            depths, weighted = {}, {}
            for w, blocks in model.items():
                n = 0
                while n < len(prompt) and prompt[n] in blocks:
                    n += 1
                if n:
                    depths[w] = n
                    weighted[w] = sum(max(weight[m] for m in blocks[h]) for h in prompt[:n])
            assert index.find_weighted_matches(prompt) == (depths, weighted)
            assert index.find_matches(prompt) == depths


def test_owners_outgrow_the_table() -> None:
    """65 workers or a hash outside 64 bits: the index moves its owners to a dict and keeps
    every answer."""
    index = KvIndex()
    for i in range(65):
        index.apply_event(f"w{i}", stored(HASHES[: 1 + i % 10]))
    assert not index.native
    assert index.find_matches(HASHES) == {f"w{i}": 1 + i % 10 for i in range(65)}
    assert index.find_matches(HASHES, candidates=["w64", "w9"]) == {"w64": 5, "w9": 10}

    odd = KvIndex()
    odd.apply_event("a", stored(HASHES[:3]))
    odd.apply_event("b", stored([HASHES[0], 2**64 + 5, -3]))
    assert not odd.native
    assert odd.find_matches(HASHES) == {"a": 3, "b": 1}
    assert odd.find_matches([HASHES[0], 2**64 + 5, -3, 99]) == {"a": 1, "b": 3}
