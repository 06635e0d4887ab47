"""KV tiers on the real tritonserver: a returning user whose history left a worker's device
pool is routed back to that worker and served from its host tier; after a restart of the
whole server, from its disk tier. Own server (small pools, tiers on, restarted)."""

from __future__ import annotations

import random
import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.integration.helpers import call_worker
from tests.metrics_catalogue import catalogue, dashboard_families, families
from tests.waiting import wait_for
from trident.launcher import Launcher
from trident.router_client import RouterClient
from trident.serve_config import ServeConfig

BLOCK = 16
HISTORY_BLOCKS = 15


class Cluster:
    def __init__(self, tmp: Path) -> None:
        # A 16 MiB pool holds 22 fp32 blocks: one history of 15 and one other prompt do not fit.
        self.config = ServeConfig(
            http_port=0, grpc_port=0, metrics_port=0, decode=2, kv_cache_mb=16, num_threads=1,
            dtype="float32", kv_host_mb=64, kv_disk_gb=1.0, kv_disk_dir=str(tmp / "kv"),
            server_log=str(tmp / "tritonserver.log"), openai_port=-1,
        )
        self.launcher: Launcher | None = None
        self.start()

    def start(self) -> None:
        self.launcher = Launcher(self.config)
        self.endpoints = self.launcher.start()

    def restart(self) -> None:
        assert self.launcher is not None
        self.launcher.stop()
        self.start()

    def stop(self) -> None:
        if self.launcher is not None:
            self.launcher.stop()

    def tier_metric(self, name: str, medium: str) -> dict[str, float]:
        """`{worker: value}` of one tier metric for one medium."""
        text = httpx.get(self.endpoints.metrics_url, timeout=10).text
        out = {}
        for labels, value in re.findall(rf"^{name}\{{([^}}]*)\}} (\S+)$", text, re.M):
            parsed = dict(re.findall(r'(\w+)="([^"]*)"', labels))
            if parsed.get("medium") == medium:
                out[parsed["worker"]] = float(value)
        return out


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("tiers"))
    try:
        yield c
    finally:
        c.stop()


def _turn(cluster: Cluster, prompt: list[int]) -> dict:
    with RouterClient(cluster.endpoints.grpc_url) as client:
        *_, last = client.generate(input_ids=prompt, max_tokens=4, temperature=0.0, ignore_eos=True)
    return last


def _direct(cluster: Cluster, worker: str, prompt: list[int]) -> None:
    """A turn sent to one worker, bypassing the router (the test places each history)."""
    call_worker(cluster.endpoints.grpc_url, worker, input_ids=np.asarray(prompt, np.int32), max_tokens=4)


def _history(seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(100, 20000) for _ in range(HISTORY_BLOCKS * BLOCK)]


def test_returning_user_is_served_from_the_host_tier_of_its_worker(cluster: Cluster) -> None:
    # One user per worker, so that no tie-break of the router can pass the test by chance.
    workers = cluster.launcher.decode_models
    histories = {w: _history(i) for i, w in enumerate(workers)}
    for i, (worker, history) in enumerate(histories.items()):
        _direct(cluster, worker, history)
        for j in range(2):  # push the history out of that worker's device pool
            _direct(cluster, worker, list(range(3000 + 800 * i + 400 * j, 3300 + 800 * i + 400 * j)))
    time.sleep(1.0)  # the workers' KV events (GPU removed, CPU stored) reach the router
    for worker, history in histories.items():
        second = _turn(cluster, history + list(range(50, 70)))
        assert second["worker"] == worker, second
        assert second["cached_tokens"] == HISTORY_BLOCKS * BLOCK, second
    assert wait_for(lambda: all(cluster.tier_metric("trident_kv_tier_onboarded_blocks_total", "CPU").get(w, 0) > 0
                                for w in workers), timeout=10), cluster.tier_metric("trident_kv_tier_onboarded_blocks_total", "CPU")
    # every tier metric the Grafana dashboard queries (docker/grafana) is exposed here
    tiered = {n for n in dashboard_families() if catalogue()[n].when == "KV tiers"}
    exposed = families(httpx.get(cluster.endpoints.metrics_url, timeout=10).text)
    assert tiered and tiered <= {n for n, f in exposed.items() if f.samples}, tiered - set(exposed)


def test_returning_user_after_a_restart_is_served_from_the_disk_tier(cluster: Cluster) -> None:
    workers = cluster.launcher.decode_models
    histories = {w: _history(10 + i) for i, w in enumerate(workers)}
    before = cluster.tier_metric("trident_kv_tier_blocks", "DISK")
    for worker, history in histories.items():
        _direct(cluster, worker, history)
        _direct(cluster, worker, history + list(range(80, 90)))  # a reuse admits the history to disk

    def on_disk() -> bool:
        held = cluster.tier_metric("trident_kv_tier_blocks", "DISK")
        return all(held.get(w, 0) >= before.get(w, 0) + HISTORY_BLOCKS for w in workers)

    assert wait_for(on_disk, timeout=20), cluster.tier_metric("trident_kv_tier_blocks", "DISK")
    cluster.restart()  # the first routed turn after it: the router has synced both workers
    for worker, history in histories.items():
        back = _turn(cluster, history + list(range(90, 110)))
        assert back["worker"] == worker, back
        assert back["cached_tokens"] == HISTORY_BLOCKS * BLOCK, back
    assert wait_for(lambda: all(cluster.tier_metric("trident_kv_tier_onboarded_blocks_total", "DISK").get(w, 0)
                                >= HISTORY_BLOCKS for w in workers), timeout=10)


pytestmark = pytest.mark.timeout(600)
