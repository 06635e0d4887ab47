"""KvRouter: decisions from index + load, pending assignments, approximate mode, worker removal."""

from __future__ import annotations

from collections import Counter

import pytest

from kv_manager.events import BlockStored
from kv_manager.hashing import hash_blocks
from kv_manager.wire import LoadReport
from router_ensemble.routing.config import RoutingConfig
from router_ensemble.routing.directory import WorkerDirectory
from router_ensemble.routing.load import LoadTable, WorkerLoad
from router_ensemble.routing.router import KvRouter, KvSelector
from trident.core.errors import ValidationError, WorkerUnavailable

BS = 16
PROMPT = list(range(1000, 1000 + 200))  # 12 full blocks + 8 tokens
HASHES = hash_blocks(PROMPT, BS)


class FakeClock:
    def __init__(self) -> None:
        self.now = 10.0

    def __call__(self) -> float:
        return self.now


def make_router(
    workers=("decode", "decode_1", "decode_2", "decode_3"), clock=None, **cfg
) -> KvRouter:
    config = RoutingConfig(block_size=BS, seed=0, **cfg)
    router = KvRouter(config, clock=clock) if clock else KvRouter(config)
    for w in workers:
        router.add_worker(w)
    return router


def report(worker: str, active: int = 0, prefill_tokens: int = 0) -> LoadReport:
    return LoadReport(worker, "i", 0.0, active, 1000, 0, 0, prefill_tokens)


def test_routes_to_the_worker_holding_the_prefix() -> None:
    router = make_router()
    router.apply_events("decode_2", [BlockStored(tuple(HASHES[:9]), None, (), BS)])
    router.apply_events("decode_1", [BlockStored(tuple(HASHES[:4]), None, (), BS)])
    decision = router.decide(PROMPT)
    assert decision.worker_id == "decode_2"
    assert decision.overlap_blocks == 9 and decision.cached_tokens == 144
    assert decision.prompt_tokens == 200 and decision.uncached_tokens == 56
    assert decision.block_hashes == tuple(HASHES)
    assert decision.overlaps == {"decode": 0, "decode_1": 4, "decode_2": 9, "decode_3": 0}
    assert decision.hashing_us > 0 and decision.lookup_us > 0 and decision.schedule_us > 0
    by_hashes = router.decide(block_hashes=HASHES)
    assert by_hashes.overlaps["decode_2"] == 9 and by_hashes.prompt_tokens == 12 * BS
    # decode_2 carries the first request's 4 new blocks as pending prefill and decode load:
    # (3 + 4) + (4 + 3) = 14 still beats decode_1's (8) + (0 + 8) = 16
    assert by_hashes.worker_id == "decode_2"
    # with the second one pending too, (3 + 7) + (7 + 3) = 20 > 16: the next goes to decode_1
    assert router.decide(block_hashes=HASHES).worker_id == "decode_1"


def test_tiers_weigh_the_overlap() -> None:
    # the same 12-block prefix: on decode's disk tier, decode_1's host memory, decode_2's
    # device; decode_3 holds nothing
    router = make_router()
    router.apply_events("decode", [BlockStored(tuple(HASHES), None, (), BS, None, "DISK")])
    router.apply_events("decode_1", [BlockStored(tuple(HASHES), None, (), BS, None, "CPU")])
    router.apply_events("decode_2", [BlockStored(tuple(HASHES), None, (), BS, None, "GPU")])
    decision = router.decide(PROMPT)
    assert decision.worker_id == "decode_2" and decision.weighted_overlap == 12
    assert decision.overlaps == {"decode": 12, "decode_1": 12, "decode_2": 12, "decode_3": 0}
    without_device = router.decide(PROMPT, candidates=["decode", "decode_1"])
    assert without_device.worker_id == "decode_1" and without_device.weighted_overlap == 9
    # the prefix is cached wherever it is, so the engine will not compute it
    assert without_device.overlap_blocks == 12 and without_device.cached_tokens == 12 * BS
    # its pending load is the weighed new blocks: 13 - 9 = 4
    assert router.loads.view("decode_1").active_blocks == 4
    # a disk hit (12 x 0.25 = 3 blocks) still beats an idle worker with none
    disk_only = router.decide(PROMPT, candidates=["decode", "decode_3"])
    assert disk_only.worker_id == "decode" and disk_only.weighted_overlap == 3


def test_tier_weights_come_from_the_config() -> None:
    router = make_router(workers=("a",), host_tier_weight=0.3)
    router.apply_events("a", [BlockStored(tuple(HASHES[:8]), None, (), BS, None, "CPU")])
    decision = router.decide(PROMPT)
    assert decision.weighted_overlap == pytest.approx(8 * 0.3)
    # pending load counts whole blocks: 13 - 2.4 -> 11
    assert router.loads.view("a").active_blocks == 11


def test_load_outweighs_a_small_overlap() -> None:
    router = make_router(workers=("a", "b"))
    router.apply_events("a", [BlockStored(tuple(HASHES[:2]), None, (), BS)])
    router.update_load("a", report("a", active=40))
    router.update_load("b", report("b", active=0))
    assert router.decide(PROMPT).worker_id == "b"


def test_pending_assignments_spread_a_burst() -> None:
    clock = FakeClock()
    router = make_router(clock=clock)
    for w in router.workers():
        router.update_load(w, report(w))
    picks = Counter(router.decide([i] * 64 + list(range(i, i + 64))).worker_id for i in range(8))
    assert picks == {"decode": 2, "decode_1": 2, "decode_2": 2, "decode_3": 2}
    # a report received long enough after the assignments replaces them
    assert router.loads.view("decode").active_blocks == 16
    clock.now += 0.05
    router.update_load("decode", report("decode", active=3))
    assert router.loads.view("decode").active_blocks == 3 + 16  # too recent to be reflected
    clock.now += 0.2
    router.update_load("decode", report("decode", active=3))
    assert router.loads.view("decode").active_blocks == 3
    clock.now += 10
    assert router.loads.view("decode_1").active_blocks == 0  # max age


def test_prefill_backlog_counts() -> None:
    router = make_router(workers=("a", "b"))
    router.update_load("a", report("a", prefill_tokens=4096))
    router.update_load("b", report("b", active=100))
    assert router.loads.view("a").prefill_blocks == 256
    assert router.decide(PROMPT).worker_id == "b"


def test_approximate_mode_assumes_then_forgets() -> None:
    clock = FakeClock()
    router = make_router(clock=clock, kv_events=False, approx_ttl_s=30.0, pending_max_age_s=1.0)
    first = router.decide(PROMPT)
    assert first.overlap_blocks == 0
    clock.now += 2  # pending load gone; assumed cache still there
    second = router.decide(PROMPT)
    assert second.worker_id == first.worker_id and second.overlap_blocks == 12
    clock.now += 31
    assert router.index.find_matches(HASHES) == {}


def test_removed_worker_gets_nothing() -> None:
    router = make_router(workers=("a", "b"))
    router.apply_events("a", [BlockStored(tuple(HASHES), None, (), BS)])
    assert router.decide(PROMPT).worker_id == "a"
    router.remove_worker("a")
    assert router.index.find_matches(HASHES) == {}
    assert all(router.decide(PROMPT).worker_id == "b" for _ in range(5))
    assert router.decide(PROMPT, candidates=["a", "b"]).worker_id == "b"
    with pytest.raises(WorkerUnavailable, match="'a'"):
        router.decide(PROMPT, candidates=["a"])
    router.remove_worker("b")
    with pytest.raises(WorkerUnavailable):
        router.decide(PROMPT)


def test_metrics() -> None:
    router = make_router(workers=("a", "b"), policy="round_robin")
    router.apply_events("a", [BlockStored(tuple(HASHES[:6]), None, (), BS)])
    for _ in range(4):
        router.decide(PROMPT)
    router.record_served("a", 200, 96)
    snap = router.metrics.snapshot()
    assert snap["decisions"] == {"a": 2, "b": 2}
    assert snap["predicted_hit_rate"] == pytest.approx(12 / 48)
    assert snap["served_hit_rate"] == pytest.approx(96 / 200)
    timing = snap["decision_us"]
    assert set(timing) == {"hashing", "lookup", "schedule", "total"}
    assert 0 < timing["total"]["p50"] <= timing["total"]["p99"]


def test_bad_input() -> None:
    router = make_router()
    with pytest.raises(ValidationError) as err:
        router.decide([1, -2, 3] * 10)
    assert err.value.field == "input_ids"
    with pytest.raises(ValidationError):
        router.decide(["a"] * 20)
    with pytest.raises(ValidationError):
        router.decide()


def test_release_ends_pending_load_and_selector_adapter() -> None:
    clock = FakeClock()
    router = make_router(workers=("a", "b"), clock=clock)
    first = router.decide(PROMPT, request_id="r1")
    assert router.loads.view(first.worker_id).active_blocks == 13
    router.release("r1")
    router.release("r1")  # twice is harmless
    assert router.loads.view(first.worker_id).active_blocks == 0
    selector = KvSelector(router, WorkerDirectory("pool", fixed=("b", "c")))  # "c": ready, never reported
    picks = {selector.select(f"q{i}", PROMPT).worker for i in range(4)}
    assert picks == {"b", "c"}
    for i in range(4):
        selector.release(f"q{i}")
    assert router.loads.view("b").active_blocks == router.loads.view("c").active_blocks == 0


def test_load_table_release_and_reused_request_ids() -> None:
    clock = FakeClock()
    loads = LoadTable(block_size=BS, grace_s=0.1, max_age_s=5.0, clock=clock)
    loads.assign("a", 3, 4, "r1")
    loads.assign("a", 5, 6, "r2")
    assert (loads.view("a").prefill_blocks, loads.view("a").active_blocks) == (8, 10)
    loads.release("r1")
    loads.release("r1")  # twice: no effect
    assert (loads.view("a").prefill_blocks, loads.view("a").active_blocks) == (5, 6)
    # a reused id names its newest assignment; the older one still expires on time
    loads.assign("a", 1, 1, "x")
    clock.now += 3
    loads.assign("b", 2, 2, "x")
    clock.now += 2.5  # a's items are past max age now, b's is not
    assert loads.views(["a", "b", "zz"]) == [WorkerLoad(0, 0), WorkerLoad(2, 2), WorkerLoad(0, 0)]
    loads.release("x")
    assert loads.view("b") == WorkerLoad(0, 0)
