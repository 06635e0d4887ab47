"""KV events across nodes: a publisher bound to TCP on a node address only with CURVE keys
from the cluster secret; a router holding the secret follows it (live events, snapshot); one
with another secret gets nothing, and the publisher logs the refusal."""

from __future__ import annotations

import dataclasses
import time

import pytest

from kv_manager.events import BlockStored
from kv_manager.hashing import hash_blocks
from kv_manager.publisher import KVEventPublisher
from router_ensemble.routing.config import RoutingConfig
from router_ensemble.routing.router import KvRouter
from router_ensemble.routing.subscriber import KvEventSubscriber, WorkerEndpoint
from tests.waiting import wait_until
from trident.core.cluster_secret import curve_keys
from trident.core.errors import ConfigError
from trident.core.types import EngineStats

BS = 16
HASHES = hash_blocks(list(range(900, 900 + 8 * BS)), BS)
STATS = EngineStats(0, 0, 0, 256, 0, 0, 0, 0, 0, 0)
KEYS = curve_keys(b"the-cluster-secret-0123456789abc")
NODE = "127.0.0.2"  # a loopback address that is not 127.0.0.1: stands for the node's address


def _router() -> KvRouter:
    return KvRouter(RoutingConfig(block_size=BS, seed=0, resync_timeout_s=0.5))


def test_a_router_with_the_secret_follows_a_remote_worker() -> None:
    router = _router()
    with KVEventPublisher("decode", f"tcp://{NODE}:0", block_size=BS, curve=KEYS) as pub, \
            KvEventSubscriber(router) as sub:
        assert pub.endpoint.startswith(f"tcp://{NODE}:") and pub.resync_endpoint.startswith(f"tcp://{NODE}:")
        pub.publish([BlockStored(tuple(HASHES[:5]), None, (), BS)])  # before the router listens: snapshot
        sub.add_worker(WorkerEndpoint("node-b/decode", pub.endpoint, reports_load=True, curve=KEYS))
        wait_until(lambda: router.index.find_matches(HASHES) == {"node-b/decode": 5},
                   tick=lambda: pub.report_load(STATS))
        pub.publish([BlockStored(tuple(HASHES[5:]), HASHES[4], (), BS)])  # live
        wait_until(lambda: router.index.find_matches(HASHES) == {"node-b/decode": 8})


OTHER = curve_keys(b"not-the-cluster-secret-987654321")


@pytest.mark.parametrize("keys, logged", [
    (OTHER, False),  # the wrong server key: the handshake fails on the subscriber's side
    # the server's public key is public: with it but without the client key, ZAP refuses
    (dataclasses.replace(OTHER, server_public=KEYS.server_public), True),
])
def test_a_router_without_the_secret_gets_nothing(keys, logged, caplog) -> None:
    router = _router()
    other = keys
    with KVEventPublisher("decode", f"tcp://{NODE}:0", block_size=BS, curve=KEYS) as pub, \
            KvEventSubscriber(router) as sub:
        pub.publish([BlockStored(tuple(HASHES[:5]), None, (), BS)])
        sub.add_worker(WorkerEndpoint("node-b/decode", pub.endpoint, reports_load=True, curve=other))
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            pub.report_load(STATS)
            time.sleep(0.1)
        assert router.index.find_matches(HASHES) == {} and router.workers() == []
    assert ("refused a subscriber without the cluster's key" in caplog.text) == logged


@pytest.mark.parametrize("endpoint, curve, match", [
    (f"tcp://{NODE}:0", None, "need the cluster secret"),
    ("tcp://0.0.0.0:0", KEYS, "not a wildcard"),
])
def test_binding_beyond_loopback_needs_curve_and_a_real_address(endpoint, curve, match) -> None:
    with pytest.raises(ConfigError, match=match):
        KVEventPublisher("decode", endpoint, block_size=BS, curve=curve)
