"""Small HTTP / metrics helpers for the integration tests (the gRPC client is trident.router_client)."""

from __future__ import annotations

import json
import re
from typing import Any

import httpx

CHAT_FRANCE = json.dumps([{"role": "user", "content": "What is the capital of France?"}])


def generate(http_url: str, model: str = "router", **body: Any) -> httpx.Response:
    return httpx.post(f"{http_url}/v2/models/{model}/generate", json=body, timeout=120)


def generate_stream(http_url: str, model: str = "router", **body: Any) -> list[dict[str, Any]]:
    """Server-sent events of generate_stream as dicts; an error event raises AssertionError."""
    events = []
    with httpx.stream("POST", f"{http_url}/v2/models/{model}/generate_stream", json=body, timeout=120) as resp:
        assert resp.status_code == 200, resp.read()
        for line in resp.iter_lines():
            if line.startswith("data:"):
                event = json.loads(line[len("data:"):])
                assert "error" not in event, event["error"]
                events.append(event)
    return events


def metric_values(metrics_url: str, name: str) -> dict[str, float]:
    """`{worker: value}` of one metric (gauge/counter) on Triton's /metrics."""
    text = httpx.get(metrics_url, timeout=10).text
    out = {}
    for match in re.finditer(rf'^{name}\{{[^}}]*worker="([^"]+)"[^}}]*\}} ([0-9.eE+-]+)$', text, re.M):
        out[match.group(1)] = float(match.group(2))
    return out
