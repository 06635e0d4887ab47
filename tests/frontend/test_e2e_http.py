"""Raw HTTP against the real stack: SSE framing, health, metrics, API key, disconnects.

A client that goes away must cancel the Triton stream: the router cancels its BLS child
stream and the decode worker aborts the request and frees its KV blocks. We check that on
the worker's own gauges (`trident_kv_blocks_used`, `trident_requests_running`) on Triton's
/metrics: they are non-zero while the request runs and back to zero within seconds after
the disconnect, long before the 2,000 requested tokens could have been generated.
"""

from __future__ import annotations

import json
import re

import httpx
import pytest

from frontend.main import BackgroundFrontend
from tests.frontend.conftest import API_KEY, MODEL_ID
from tests.integration.helpers import metric_values
from tests.integration.server_fixture import ServerInfo
from tests.waiting import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

LONG = {
    "model": MODEL_ID,
    "messages": [{"role": "user", "content": "Write a very long story about a lighthouse."}],
    "max_tokens": 2000,
    "temperature": 0,
    "ignore_eos": True,
}
LONG_SYSTEM = "You are a careful assistant who answers questions about the sea. " * 12


def _worker_totals(server: ServerInfo) -> tuple[float, float]:
    blocks = metric_values(server.metrics_url, "trident_kv_blocks_used")
    running = metric_values(server.metrics_url, "trident_requests_running")
    return sum(blocks.values()), sum(running.values())


def _frontend_metric(base_url: str, line_prefix: str) -> float:
    text = httpx.get(f"{base_url}/metrics", timeout=10).text
    match = re.search(rf"^{re.escape(line_prefix)} ([0-9.eE+-]+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def test_sse_framing_on_the_wire(base_url: str) -> None:
    body = {**LONG, "max_tokens": 5, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body, timeout=120) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        raw = resp.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    payloads = [json.loads(e[len("data: ") :]) for e in events[:-2]]
    assert all(e.startswith("data: ") for e in events[:-1])
    assert {p["id"] for p in payloads} == {payloads[0]["id"]}
    assert payloads[0]["choices"][0]["delta"]["role"] == "assistant"
    assert payloads[-2]["choices"][0]["finish_reason"] == "length"
    assert payloads[-1]["usage"]["completion_tokens"] == 5


def test_health_lists_ready_workers(base_url: str, triton_server: ServerInfo) -> None:
    resp = httpx.get(f"{base_url}/health", timeout=30)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["status"] == "ready" and body["router"] is True
    assert set(triton_server.decode_models) <= set(body["workers"])


def test_prompt_tokens_details_reports_cached_tokens(base_url: str) -> None:
    """The same long prompt three times: whatever worker the router picks, it sees it again."""
    body = {
        "model": MODEL_ID,
        "messages": [{"role": "system", "content": LONG_SYSTEM}, {"role": "user", "content": "Hi"}],
        "max_tokens": 2,
        "temperature": 0,
    }
    usages = [
        httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=120).json()["usage"]
        for _ in range(3)
    ]
    assert usages[0]["prompt_tokens"] > 100
    cached = [u["prompt_tokens_details"]["cached_tokens"] for u in usages]
    assert max(cached) > 0, usages
    assert all(0 <= c < u["prompt_tokens"] for c, u in zip(cached, usages, strict=True))


def test_metrics_has_latency_histograms(base_url: str) -> None:
    httpx.post(
        f"{base_url}/v1/completions",
        json={"model": MODEL_ID, "prompt": "Hello", "max_tokens": 4, "stream": True},
        timeout=120,
    )
    text = httpx.get(f"{base_url}/metrics", timeout=10).text
    ttft = re.search(
        rf'^trident_frontend_time_to_first_token_seconds_count\{{model="{MODEL_ID}"\}} (\d+)$',
        text,
        re.M,
    )
    itl = re.search(
        rf'^trident_frontend_inter_token_latency_seconds_count\{{model="{MODEL_ID}"\}} (\d+)$',
        text,
        re.M,
    )
    assert ttft and int(ttft.group(1)) >= 1
    assert itl and int(itl.group(1)) >= 3
    assert 'trident_frontend_requests_total{endpoint="completions",status="200"}' in text


def test_api_key_on_the_real_stack(keyed_frontend: BackgroundFrontend) -> None:
    url = f"{keyed_frontend.base_url}/v1/chat/completions"
    body = {**LONG, "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer nope"}):
        resp = httpx.post(url, json=body, headers=headers, timeout=60)
        assert resp.status_code == 401
        assert resp.json()["error"]["type"] == "authentication_error"
    ok = httpx.post(url, json=body, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2


def test_wrong_types_and_router_side_errors(base_url: str) -> None:
    url = f"{base_url}/v1/chat/completions"
    cases = [
        ({**LONG, "max_tokens": "5"}, 400, "max_tokens"),
        ({**LONG, "stop": [1, 2]}, 400, "stop"),
        (
            {**LONG, "messages": [{"role": "user", "content": {"text": "x"}}]},
            400,
            "messages[0].content",
        ),
        ({**LONG, "max_tokens": 9000}, 400, "max_tokens"),  # over the 8192-token context
        ({**LONG, "model": "nope"}, 404, "model"),
    ]
    for body, status, param in cases:
        for stream in (False, True):
            resp = httpx.post(url, json={**body, "stream": stream}, timeout=60)
            assert resp.status_code == status, (body, resp.text)
            assert resp.json()["error"]["param"] == param
    resp = httpx.post(
        url, content=b'{"model": ', headers={"content-type": "application/json"}, timeout=60
    )
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "invalid_json"


def _assert_freed_after(
    server: ServerInfo, base_url: str, endpoint_label: str, disconnects_before: float
) -> None:
    assert wait_for(lambda: _worker_totals(server) == (0.0, 0.0), timeout=15.0), _worker_totals(
        server
    )
    line = f'trident_frontend_client_disconnects_total{{endpoint="{endpoint_label}"}}'
    assert wait_for(lambda: _frontend_metric(base_url, line) > disconnects_before, timeout=5.0)
    assert (
        _frontend_metric(
            base_url, f'trident_frontend_inflight_requests{{endpoint="{endpoint_label}"}}'
        )
        == 0.0
    )


def test_disconnect_mid_stream_frees_worker_blocks(
    base_url: str, triton_server: ServerInfo
) -> None:
    assert wait_for(lambda: _worker_totals(triton_server) == (0.0, 0.0), timeout=15.0)
    before = _frontend_metric(
        base_url, 'trident_frontend_client_disconnects_total{endpoint="chat_completions"}'
    )
    with httpx.stream(
        "POST", f"{base_url}/v1/chat/completions", json={**LONG, "stream": True}, timeout=120
    ) as resp:
        assert resp.status_code == 200
        chunks = 0
        for line in resp.iter_lines():
            chunks += line.startswith("data: ")
            if chunks >= 6:
                break
        # The request holds blocks on a worker while we are connected (seen in the metrics
        # unless the scrape lags on a loaded machine; the freeing check below is the point).
        wait_for(lambda: _worker_totals(triton_server)[0] > 0, timeout=5.0)
    # Leaving the block closed the connection mid-stream.
    _assert_freed_after(triton_server, base_url, "chat_completions", before)


def test_disconnect_while_waiting_for_a_non_streaming_response(
    base_url: str, triton_server: ServerInfo
) -> None:
    assert wait_for(lambda: _worker_totals(triton_server) == (0.0, 0.0), timeout=15.0)
    before = _frontend_metric(
        base_url, 'trident_frontend_client_disconnects_total{endpoint="completions"}'
    )
    body = {"model": MODEL_ID, "prompt": "Once upon a time", "max_tokens": 2000, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{base_url}/v1/completions", json=body, timeout=httpx.Timeout(60, read=3.0))
    _assert_freed_after(triton_server, base_url, "completions", before)
