"""Three tritonservers on this machine as three nodes, found through a real etcd: node A runs
the router and a local decode worker; node B (its own address, 127.0.0.2) a decode worker;
node C (127.0.0.3) a prefill worker only. B's and C's workers register in etcd and
publish their KV events over TCP with CURVE; A's router reaches them over Triton gRPC
streaming, and C's prefill worker hands its KV to a decode worker of another node through
NIXL.

- a shared prefix held by B's worker is routed back to it, and its answer equals A's local
  worker's on the same prompt, token for token;
- a long prompt is prefilled on C and decoded on another node (its KV read through NIXL),
  with the same tokens as A's worker computing it alone;
- killing B's tritonserver mid-stream moves that request to A's worker (same tokens, one
  stream), new requests go to A's worker, and B drops out of etcd when its lease expires."""

from __future__ import annotations

import os
import random
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.etcd_server import etcd_server
from tests.integration.helpers import call_worker
from tests.waiting import wait_for
from trident.core.discovery import EtcdClient, EtcdWorkers
from trident.launcher import Launcher
from trident.router_client import RouterClient
from trident.serve_config import ServeConfig

SECRET = "multinode-test-secret-0123456789"
NODE_B, NODE_C = "127.0.0.2", "127.0.0.3"
REMOTE = "node-b/decode"
DISAGG_TOKENS = 64  # A's router prefills remotely from this many uncached prompt tokens
pytestmark = pytest.mark.timeout(900)


class Cluster:
    def __init__(self, tmp: Path, etcd: str) -> None:
        common = dict(http_port=0, grpc_port=0, metrics_port=0, kv_cache_mb=64, num_threads=1,
                      dtype="float32", openai_port=-1, etcd=etcd)
        self.etcd = etcd
        self.b = Launcher(ServeConfig(**common, role="worker", host=NODE_B, node_name="node-b", node_address=NODE_B,
                                      server_log=str(tmp / "node-b.log")))
        self.c = Launcher(ServeConfig(**common, role="worker", host=NODE_C, node_name="node-c", node_address=NODE_C, prefill=1, decode=0,
                                      server_log=str(tmp / "node-c.log")))
        self.a = Launcher(ServeConfig(**common, disagg_threshold=DISAGG_TOKENS, server_log=str(tmp / "node-a.log")))
        self.b_endpoints = self.b.start()
        self.c_endpoints = self.c.start()
        self.a_endpoints = self.a.start()

    def registered(self) -> set[str]:
        client = EtcdClient(self.etcd)
        try:
            return set(EtcdWorkers(client, SECRET.encode()).records())
        finally:
            client.close()

    def stop(self) -> None:
        self.a.stop()
        self.c.stop()
        self.b.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    old = os.environ.get("TRIDENT_KV_SECRET")
    os.environ["TRIDENT_KV_SECRET"] = SECRET  # both servers inherit the cluster secret
    try:
        with etcd_server(tmp_path_factory.mktemp("etcd")) as url:
            c = Cluster(tmp_path_factory.mktemp("nodes"), url)
            try:
                yield c
            finally:
                c.stop()
    finally:
        if old is None:
            os.environ.pop("TRIDENT_KV_SECRET", None)
        else:
            os.environ["TRIDENT_KV_SECRET"] = old


def _routed(cluster: Cluster, prompt: list[int], n: int = 6) -> tuple[list[int], dict]:
    with RouterClient(cluster.a_endpoints.grpc_url) as client:
        responses = client.generate(input_ids=prompt, max_tokens=n, temperature=0.0, ignore_eos=True)
    return [t for r in responses for t in r.get("output_ids", [])], responses[-1]


def _direct_tokens(grpc_url: str, model: str, prompt: list[int], n: int = 6) -> list[int]:
    out = call_worker(grpc_url, model, input_ids=np.asarray(prompt, np.int32), max_tokens=n, temperature=0.0,
                      ignore_eos=True)
    return [int(t) for r in out for t in r.get("output_ids", [])]


def _history(seed: int, blocks: int = 12) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(100, 20000) for _ in range(blocks * 16)]


def test_a_shared_prefix_goes_back_to_its_node_with_the_same_answer(cluster: Cluster) -> None:
    assert wait_for(lambda: REMOTE in cluster.registered(), timeout=20), cluster.registered()
    history = _history(1)
    _direct_tokens(cluster.b_endpoints.grpc_url, "decode", history)  # B's worker now holds it
    prompt = history + list(range(40, 60))
    time.sleep(1.0)  # B's KV events reach A's router over TCP
    tokens, last = _routed(cluster, prompt)
    assert last["worker"] == REMOTE, last
    assert last["cached_tokens"] == len(history), last
    assert tokens == _direct_tokens(cluster.a_endpoints.grpc_url, "decode", prompt)
    # and a prefix A's own worker holds stays on A
    other = _history(2)
    _direct_tokens(cluster.a_endpoints.grpc_url, "decode", other)
    time.sleep(0.5)
    assert _routed(cluster, other + [7, 8, 9])[1]["worker"] == "decode"


def test_a_long_prompt_is_prefilled_on_another_node_with_the_same_answer(cluster: Cluster) -> None:
    assert wait_for(lambda: "node-c/prefill" in cluster.registered(), timeout=20), cluster.registered()
    prompt = _history(4, blocks=10)
    tokens, last = _routed(cluster, prompt, n=8)
    assert last["worker"] in ("node-c/prefill>decode", f"node-c/prefill>{REMOTE}"), last
    assert tokens == _direct_tokens(cluster.a_endpoints.grpc_url, "decode", prompt, n=8)


def test_a_node_killed_mid_stream_moves_its_requests_and_drops_out(cluster: Cluster) -> None:
    history = _history(3)
    _direct_tokens(cluster.b_endpoints.grpc_url, "decode", history)
    time.sleep(1.0)
    prompt = history + [5, 6]  # A's worker does not hold it: only B's cache decides the route
    with RouterClient(cluster.a_endpoints.grpc_url) as client:
        stream = client.stream(input_ids=prompt, max_tokens=120, temperature=0.0, ignore_eos=True, stream=True)
        first = next(stream)
        tokens = list(first.get("output_ids", []))
        while not tokens:  # tokens are flowing: the request is mid-stream
            first = next(stream)
            tokens += list(first.get("output_ids", []))
        assert first["worker"] == REMOTE, first
        proc = cluster.b._proc
        assert proc is not None
        os.killpg(proc.pid, signal.SIGKILL)  # the node dies: no leave, no lease revoked
        started = time.monotonic()
        last = first
        for last in stream:
            tokens += list(last.get("output_ids", []))
        assert time.monotonic() - started < 30
    # the router moved the request to A's worker (its prompt and tokens so far are uncached
    # there, so C may prefill them): one stream, the undisturbed tokens
    expected = _direct_tokens(cluster.a_endpoints.grpc_url, "decode", prompt, n=120)
    assert tokens == expected and last["finish_reason"] == "length", last
    assert last["worker"] in ("decode", "node-c/prefill>decode"), last
    # new requests go to the node that is left, even the killed node's users
    tokens, last = _routed(cluster, history + [11, 12])
    assert REMOTE not in last["worker"] and len(tokens) == 6, last
    assert wait_for(lambda: REMOTE not in cluster.registered(), timeout=15)  # its lease expired
    # and A's router forgot it: the decode pool is A's worker alone (the router flushes its
    # metrics after each request: each probe is one)
    assert wait_for(lambda: metric_values_by_pool(cluster.a_endpoints.metrics_url).get("decode") == 1, timeout=15,
                    interval=0.5, tick=lambda: _routed(cluster, [9] * 20, n=1))


def metric_values_by_pool(metrics_url: str) -> dict[str, float]:
    text = httpx.get(metrics_url, timeout=10).text
    return {pool: float(v) for pool, v in re.findall(r'^trident_router_live_workers\{[^}]*pool="([^"]+)"[^}]*\} (\S+)$',
                                                   text, re.M)}
