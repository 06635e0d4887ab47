"""KV-aware routing on the real tritonserver: prefix affinity, cached_tokens, /metrics."""

from __future__ import annotations

import json
import re
import uuid

import httpx

from tests.integration.server_fixture import ServerInfo
from tests.waiting import wait_for
from trident.router_client import RouterClient


def _chat(system: str, question: str) -> str:
    return json.dumps([{"role": "system", "content": system}, {"role": "user", "content": question}])


def test_repeated_prefix_lands_on_the_worker_that_cached_it(triton_server: ServerInfo) -> None:
    # a system prompt no other test sends: ~200 tokens, unique per run
    system = f"Session {uuid.uuid4().hex}. " + " ".join(f"rule {i}: be kind and brief." for i in range(25))
    with RouterClient(triton_server.grpc_url) as client:
        (first,) = client.generate(messages=_chat(system, "What is two plus two?"), max_tokens=4, temperature=0.0)
        assert first["cached_tokens"] == 0
        worker = first["worker"]
        assert worker in triton_server.decode_models
        # once the worker's KV events reached the router, the same prefix goes back there
        hits = []

        def routed_to_cache() -> bool:
            (out,) = client.generate(messages=_chat(system, f"Question {len(hits)}?"), max_tokens=2, temperature=0.0)
            hits.append(out)
            return out["worker"] == worker and out["cached_tokens"] > 0

        assert wait_for(routed_to_cache, timeout=10, interval=0.3), hits
        out = hits[-1]
        assert out["cached_tokens"] % 16 == 0 and out["cached_tokens"] >= 160, out
        assert out["cached_tokens"] < out["num_input_tokens"]


def test_routing_metrics_on_the_metrics_endpoint(triton_server: ServerInfo) -> None:
    with RouterClient(triton_server.grpc_url) as client:
        client.generate(text_input="Metrics, please: " + "word " * 40, max_tokens=2)

    def families() -> str:
        return httpx.get(triton_server.metrics_url, timeout=10).text

    assert wait_for(lambda: "trident_router_decisions_total{" in families(), timeout=10)
    text = families()
    decisions = re.findall(r'^trident_router_decisions_total\{([^}]*)\} (\S+)$', text, re.M)
    workers = {re.search(r'worker="([^"]+)"', labels).group(1) for labels, _ in decisions}  # type: ignore[union-attr]
    assert workers <= set(triton_server.decode_models) and workers
    assert all('policy="kv"' in labels and 'router="router"' in labels for labels, _ in decisions)
    assert sum(float(v) for _, v in decisions) >= 1
    for phase in ("hashing", "lookup", "schedule", "total"):
        assert re.search(rf'^trident_router_decision_seconds_count\{{[^}}]*phase="{phase}"[^}}]*\}} [1-9]', text, re.M), phase
    for kind in ("predicted", "served"):
        assert re.search(rf'^trident_router_cache_hit_ratio\{{[^}}]*kind="{kind}"', text, re.M), kind
    assert re.search(r'^trident_router_prompt_tokens_total\{[^}]*\} [1-9]', text, re.M)
    assert re.search(r'^trident_router_live_workers\{[^}]*\} 2$', text, re.M)
