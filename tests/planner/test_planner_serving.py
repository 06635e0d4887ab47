"""The planner against the real tritonserver: a load step up makes it add a decode replica
that the router then uses; a step down drains and unloads that replica while streams run.
Every request completes without error, and the removed worker's stub, shared-memory regions
and metrics are gone.

The server is this module's own (one decode worker to start with), so that resizing its
pools cannot disturb the session server other tests share.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from planner.config import PlannerConfig
from planner.connectors.triton import TritonConnector
from planner.loop import PlannerLoop
from planner.metrics import inflight, scrape
from tests.integration.helpers import call_worker, metric_values
from tests.waiting import wait_for
from trident.launcher import REPO_ROOT, Launcher
from trident.model_control import ModelControl
from trident.router_client import RouterClient
from trident.serve_config import ServeConfig

logger = logging.getLogger(__name__)
pytestmark = [pytest.mark.integration, pytest.mark.slow]

# A TTFT target that one worker misses with four long prompts in flight (~2-3 s: they queue
# for prefill) and meets with two short ones (~0.3 s). Decode is not what a second worker
# helps with on this 2-core machine (both workers together decode no faster than one), so
# the ITL target is out of the way.
CONFIG = PlannerConfig(
    mode="load", ttft_target_ms=1500, itl_target_ms=1000, headroom=1.0, down_margin=0.9,
    interval_s=2.0, scrape_s=0.5, min_decode=1, max_decode=2, budget=2,
    up_cooldown_s=0, down_cooldown_s=0, down_windows=2,
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Launcher]:
    tmp = tmp_path_factory.mktemp("planner-server")
    launcher = Launcher(ServeConfig(
        http_port=0, grpc_port=0, metrics_port=0, decode=1, kv_cache_mb=64, num_threads=1,
        log_level="info", server_log=str(tmp / "tritonserver.log"),
    ))
    launcher.start()
    try:
        yield launcher
    finally:
        launcher.stop()


class Load:
    """`streams` client threads sending streaming requests back to back until stopped;
    every outcome is kept."""

    def __init__(self, grpc_url: str, streams: int, prompt_tokens: int, max_tokens: int) -> None:
        self.grpc_url = grpc_url
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.results: list[tuple[str, str, int]] = []  # (worker, finish_reason, tokens)
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(streams)]
        for t in self._threads:
            t.start()

    def _run(self, seed: int) -> None:
        rng = np.random.default_rng(seed)
        with RouterClient(self.grpc_url) as client:
            while not self._stop.is_set():
                prompt = [int(x) for x in rng.integers(100, 20000, size=self.prompt_tokens)]
                try:
                    last = list(client.stream(input_ids=prompt, max_tokens=self.max_tokens, ignore_eos=True,
                                              stream=True))[-1]
                    self.results.append((last["worker"], last["finish_reason"], int(last["num_output_tokens"])))
                except Exception as exc:  # every failure is a test failure, reported below
                    self.errors.append(repr(exc))

    def workers(self) -> set[str]:
        return {r[0] for r in self.results}

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=120)


LONG_TOKENS = 100


class DrainWatchingConnector(TritonConnector):
    """The planner's Triton connector, plus: once a worker is marked draining, one request
    goes straight to it and the drain proper starts only when that request is running there,
    so that a request is certainly in flight on the worker the planner removes (which of the
    router's streams are on it then is the router's business)."""

    def __init__(self, grpc_url: str, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.grpc_url = grpc_url
        self.pinned: dict[str, object] = {}
        self.pinned_thread: threading.Thread | None = None
        self.drained_at = float("inf")

    def _wait_drained(self, worker: str) -> None:
        self.pinned_thread = threading.Thread(target=_long_stream, args=(self.grpc_url, worker, self.pinned), daemon=True)
        self.pinned_thread.start()
        assert wait_for(lambda: (inflight(self.read_metrics(), worker) or 0) >= 1, timeout=30, interval=0.1)
        super()._wait_drained(worker)
        self.drained_at = time.monotonic()


def _long_stream(grpc_url: str, worker: str, result: dict[str, object]) -> None:
    """One long greedy request straight to `worker` (not through the router); its start and
    end (the planner's clock, time.monotonic) and token count go into `result`."""
    result["start"] = time.monotonic()
    try:
        out = call_worker(grpc_url, worker, input_ids=np.arange(500, 596, dtype=np.int32), max_tokens=LONG_TOKENS,
                          temperature=0.0, ignore_eos=np.array([True]))
        result["tokens"] = sum(len(o["output_ids"]) for o in out)
    except Exception as exc:  # reported by the test's assertion on `result`
        result["error"] = repr(exc)
    result["end"] = time.monotonic()


def _shm(prefixes: tuple[str, ...]) -> set[str]:
    return {p.name for p in Path("/dev/shm").iterdir() if p.name.startswith(prefixes)}


def test_load_step_adds_a_replica_and_a_step_down_drains_it_without_dropping_a_request(server: Launcher) -> None:
    ep = server.endpoints
    assert ep is not None and server.kv_events_dir is not None
    control = ModelControl(ep.http_url, server.key)
    connector = DrainWatchingConnector(
        ep.grpc_url, control, server.repository, server.kv_events_dir, lambda: scrape(ep.metrics_url, 0.0),
        root=str(REPO_ROOT), settle_s=1.0, drain_timeout_s=120,
    )
    loop = PlannerLoop(CONFIG, connector, lambda t: scrape(ep.metrics_url, t), budget=2)
    shm_prefixes = (server.shm_prefix, "trident_kv_")
    shm_before = _shm(shm_prefixes)
    stop = threading.Event()
    planner = threading.Thread(target=loop.run, args=(stop,), daemon=True)
    planner.start()
    high = low = None
    try:
        high = Load(ep.grpc_url, streams=4, prompt_tokens=384, max_tokens=8)
        assert wait_for(lambda: connector.replicas()["decode"] == ("decode", "decode_1"), timeout=120, interval=0.5), \
            f"the planner did not add a replica: {[r.decision.reasons for r in loop.records[-3:]]}"
        assert wait_for(lambda: "decode_1" in high.workers(), timeout=60, interval=0.5), "the router never used decode_1"
        # the low load starts while both workers still serve the high one, so that requests
        # keep flowing when the planner sees the load fall and drains decode_1
        low = Load(ep.grpc_url, streams=2, prompt_tokens=96, max_tokens=48)
        high.stop()
        grown = _shm(shm_prefixes)
        assert grown > shm_before, "decode_1 should have its own shared-memory regions"
        assert wait_for(lambda: connector.replicas()["decode"] == ("decode",) and not control.is_ready("decode_1"),
                        timeout=180, interval=0.5), \
            f"the planner did not remove decode_1: {[r.decision.reasons for r in loop.records[-3:]]}"
        time.sleep(2.0)  # requests keep flowing, to decode alone
        low.stop()
    finally:
        stop.set()
        for load in (high, low):
            if load is not None:
                load.stop()
        planner.join(timeout=180)
        if connector.pinned_thread is not None:
            connector.pinned_thread.join(timeout=120)

    results = high.results + low.results
    assert not high.errors and not low.errors, (high.errors + low.errors)[:5]
    assert results and all(reason == "length" and n in (8, 48) for _, reason, n in results)
    assert low.results[-1][0] == "decode"
    added = [r for r in loop.records if r.decision.targets["decode"] == 2 and r.replicas["decode"] == 1]
    removed = [r for r in loop.records if r.decision.targets["decode"] == 1 and r.replicas["decode"] == 2]
    assert added and removed
    # TTFT over its target grew the pool (ITL may have been over too on a busy machine)
    assert re.search(r"over the (\w+/)*ttft(/\w+)* target", added[0].decision.reasons["decode"])
    # the request running on decode_1 while the planner drained it finished whole, before the unload
    pinned = connector.pinned
    assert pinned.get("tokens") == LONG_TOKENS and "error" not in pinned, pinned
    assert pinned["end"] <= connector.drained_at, (pinned, connector.drained_at)
    # the removed worker is gone: no stub regions, no KV pool, no metrics; nothing is marked draining
    assert wait_for(lambda: _shm(shm_prefixes) == shm_before, timeout=30), _shm(shm_prefixes) ^ shm_before
    assert "decode_1" not in metric_values(ep.metrics_url, "trident_requests_running")
    assert wait_for(lambda: metric_values(ep.metrics_url, "trident_kv_blocks_used").get("decode") == 0, timeout=10)
    assert not list(server.kv_events_dir.glob("*.draining"))
