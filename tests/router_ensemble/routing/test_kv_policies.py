"""Routing policies: Dynamo's cost, temperature sampling, the comparison policies, config."""

from __future__ import annotations

from collections import Counter

import pytest

from router_ensemble.routing.config import RoutingConfig
from router_ensemble.routing.load import WorkerLoad
from router_ensemble.routing.policies import (
    Candidate,
    KvPolicy,
    LeastLoaded,
    RandomPolicy,
    RoundRobin,
    make_policy,
)
from trident.core.errors import ConfigError


def cand(
    worker: str,
    overlap: int = 0,
    active: int = 0,
    prefill: int = 0,
    waiting: int = 0,
    weighted: float | None = None,
) -> Candidate:
    return Candidate(worker, overlap, WorkerLoad(active, prefill, waiting=waiting), weighted)


def test_kv_cost_is_dynamos() -> None:
    policy = KvPolicy(overlap_weight=2.0)
    # w * (new + backlog) + active + new, new = request - overlap (potential active blocks)
    assert policy.cost(cand("a", overlap=3, active=7, prefill=2), request_blocks=10) == 2.0 * 9 + 7 + 7


def test_the_cost_counts_the_tier_weighted_overlap() -> None:
    policy = KvPolicy(overlap_weight=2.0)
    # 8 blocks held, weighed to 5.5 (say 4 on the device, 2 in host memory, 2 on disk):
    # new = 10 - 5.5 = 4.5 in both terms
    c = cand("a", overlap=8, active=7, prefill=2, weighted=5.5)
    assert c.hit_blocks == 5.5 and cand("b", overlap=8).hit_blocks == 8
    assert policy.cost(c, request_blocks=10) == 2.0 * (4.5 + 2) + 7 + 4.5


def test_a_device_hit_beats_the_same_hit_in_lower_tiers() -> None:
    policy = KvPolicy()
    device, host = cand("device", 8), cand("host", 8, weighted=6.0)
    disk = cand("disk", 8, weighted=2.0)
    assert policy.select([disk, device], 10).worker_id == "device"
    assert policy.select([disk, host], 10).worker_id == "host"
    assert policy.select([host, device, disk], 10).worker_id == "device"
    # a disk hit still beats no hit at all, and a device hit loses to it when busy enough
    assert policy.select([cand("idle"), disk], 10).worker_id == "disk"
    assert policy.select([cand("busy", 8, active=15), disk], 10).worker_id == "disk"


def test_a_busy_prefix_holder_keeps_its_group() -> None:
    # running one request of the group, the holder's active blocks include the shared prefix
    # (33 of 38 blocks); the idle worker would add all 38 blocks: the holder still wins
    policy = KvPolicy()
    holder, idle = cand("holder", overlap=33, active=40), cand("idle")
    assert policy.cost(holder, 38) == 5 + 40 + 5 < policy.cost(idle, 38) == 38 + 38
    assert policy.select([idle, holder], 38).worker_id == "holder"
    # much busier, it spills
    assert policy.select([idle, cand("holder", overlap=33, active=80)], 38).worker_id == "idle"


def test_kv_prefers_overlap_then_load() -> None:
    policy = KvPolicy()
    assert policy.select([cand("a", 2), cand("b", 8), cand("c", 5)], 10).worker_id == "b"
    # b's cache saves 8 blocks but it is 20 blocks busier: a wins
    assert policy.select([cand("a", 0, active=0), cand("b", 8, active=20)], 10).worker_id == "a"
    # a heavier overlap weight flips it
    assert (
        KvPolicy(overlap_weight=3.0).select([cand("a", 0), cand("b", 8, active=20)], 10).worker_id
        == "b"
    )
    # weight 0: no prefill term, only potential decode blocks (a: 20 + 1, b: 4 + 10)
    assert (
        KvPolicy(overlap_weight=0.0)
        .select([cand("a", 9, active=20), cand("b", 0, active=4)], 10)
        .worker_id
        == "b"
    )


def test_ties_are_shared_reproducibly() -> None:
    def picks(seed: int) -> list[str]:
        policy = KvPolicy(seed=seed)
        return [policy.select([cand("a"), cand("b"), cand("c")], 4).worker_id for _ in range(60)]

    assert picks(1) == picks(1)
    assert set(picks(1)) == {"a", "b", "c"}


def test_temperature_samples_by_cost() -> None:
    options = [cand("a", overlap=10), cand("b", overlap=5), cand("c", overlap=0)]
    cold = KvPolicy(temperature=0.0, seed=0)
    assert {cold.select(options, 10).worker_id for _ in range(50)} == {"a"}
    warm = KvPolicy(temperature=0.5, seed=0)
    counts = Counter(warm.select(options, 10).worker_id for _ in range(3000))
    assert counts["a"] > counts["b"] > counts["c"] > 0
    # softmax of normalised costs 0, 0.5, 1 at T=0.5: weights 1, e^-1, e^-2
    assert counts["a"] / 3000 == pytest.approx(1 / (1 + 0.3679 + 0.1353), abs=0.04)
    again = KvPolicy(temperature=0.5, seed=0)
    replay = KvPolicy(temperature=0.5, seed=0)
    assert [again.select(options, 10) for _ in range(100)] == [
        replay.select(options, 10) for _ in range(100)
    ]


def test_round_robin_random_least_loaded() -> None:
    options = [cand("a", 9, active=50), cand("b"), cand("c", active=3)]
    rr = RoundRobin()
    assert [rr.select(options, 1).worker_id for _ in range(6)] == ["a", "b", "c", "a", "b", "c"]
    rand = [RandomPolicy(seed=3).select(options, 1).worker_id for _ in range(5)]
    assert rand == [RandomPolicy(seed=3).select(options, 1).worker_id for _ in range(5)]
    least = LeastLoaded()
    assert least.select(options, 1).worker_id == "b"
    tied = [cand("a", waiting=1), cand("b"), cand("c")]
    assert [least.select(tied, 1).worker_id for _ in range(4)] == ["c", "b", "c", "b"]


def test_make_policy() -> None:
    for name, cls in (
        ("kv", KvPolicy),
        ("round_robin", RoundRobin),
        ("random", RandomPolicy),
        ("least_loaded", LeastLoaded),
    ):
        assert isinstance(make_policy(name), cls)
    with pytest.raises(ConfigError, match="unknown routing policy 'fastest'.*least_loaded"):
        make_policy("fastest")
    with pytest.raises(ConfigError, match="temperature"):
        make_policy("kv", temperature=-1)


def test_router_config_from_mapping() -> None:
    cfg = RoutingConfig.from_mapping(
        {
            "policy": "least_loaded",
            "overlap_weight": "2.5",
            "kv_events": "false",
            "seed": "${SEED}",
        },
        env={"TRIDENT_ROUTER_POLICY": "random", "TRIDENT_ROUTER_BLOCK_SIZE": "32"},
    )
    assert cfg.policy == "random" and cfg.overlap_weight == 2.5 and not cfg.kv_events
    assert cfg.block_size == 32 and cfg.rng_seed is None
    with pytest.raises(ConfigError, match="policy"):
        RoutingConfig.from_mapping({"policy": "nearest"}, env={})
    with pytest.raises(ConfigError, match="block_size"):
        RoutingConfig.from_mapping({"block_size": "sixteen"}, env={})
    with pytest.raises(ConfigError, match="worker_timeout_s"):
        RoutingConfig.from_mapping({"worker_timeout_s": "0"}, env={})


def test_tier_weights_config() -> None:
    assert (RoutingConfig().host_tier_weight, RoutingConfig().disk_tier_weight) == (0.75, 0.25)
    cfg = RoutingConfig.from_mapping(
        {"host_tier_weight": "0.5", "disk_tier_weight": "0.2"},
        env={"TRIDENT_ROUTER_DISK_TIER_WEIGHT": "0.1"},
    )
    assert cfg.host_tier_weight == 0.5 and cfg.disk_tier_weight == 0.1
    assert RoutingConfig.from_mapping({"host_tier_weight": "1", "disk_tier_weight": "0"}, env={})
    for key, raw in (
        ("host_tier_weight", "-0.25"),
        ("host_tier_weight", "1.5"),
        ("disk_tier_weight", "nan"),
        ("disk_tier_weight", "inf"),
    ):
        with pytest.raises(ConfigError, match=f"{key} must be between 0 and 1.*{raw}"):
            RoutingConfig.from_mapping({key: raw}, env={})
    with pytest.raises(ConfigError, match="host_tier_weight: cannot parse"):
        RoutingConfig.from_mapping({"host_tier_weight": "high"}, env={})
