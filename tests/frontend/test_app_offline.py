"""The real FastAPI app with no Triton behind it: everything decided before the router.

The app points at a closed port, so generation requests that pass validation really try
Triton and must answer 503; everything else (auth, validation, 404s, health, metrics)
must be answered without it.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from frontend.app import create_app
from frontend.args import FrontendConfig

KEY = "test-key-123"
CHAT = {"model": "trident", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _client(**cfg: object) -> Iterator[TestClient]:
    config = FrontendConfig(triton_url=f"127.0.0.1:{_closed_port()}", health_timeout_s=2.0, **cfg)  # type: ignore[arg-type]
    with TestClient(create_app(config), raise_server_exceptions=False) as client:
        yield client


@pytest.fixture()
def client() -> Iterator[TestClient]:
    yield from _client(model_names=("SmolLM2-135M-Instruct",))


@pytest.fixture()
def keyed() -> Iterator[TestClient]:
    yield from _client(api_key=KEY)


def _assert_error(resp, status: int, param: str | None = None) -> dict:  # type: ignore[no-untyped-def]
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    if param is not None:
        assert body["error"]["param"] == param
    return body["error"]


def test_models_lists_configured_id(client: TestClient) -> None:
    data = client.get("/v1/models").json()
    assert data["object"] == "list"
    assert [m["id"] for m in data["data"]] == ["SmolLM2-135M-Instruct"]
    assert client.get("/v1/models/router").json()["id"] == "router"
    _assert_error(client.get("/v1/models/gpt-4"), 404, "model")


def test_unknown_model_is_404(client: TestClient) -> None:
    err = _assert_error(
        client.post("/v1/chat/completions", json={**CHAT, "model": "gpt-4"}), 404, "model"
    )
    assert err["code"] == "model_not_found"
    _assert_error(client.post("/v1/completions", json={"model": "x", "prompt": "a"}), 404, "model")


def test_malformed_and_mistyped_bodies_are_400(client: TestClient) -> None:
    err = _assert_error(
        client.post(
            "/v1/chat/completions",
            content=b'{"model": "trident", ',
            headers={"content-type": "application/json"},
        ),
        400,
    )
    assert err["code"] == "invalid_json"
    _assert_error(
        client.post("/v1/chat/completions", json={**CHAT, "temperature": "warm"}),
        400,
        "temperature",
    )
    _assert_error(client.post("/v1/chat/completions", json={**CHAT, "n": 1000}), 400, "n")
    _assert_error(
        client.post("/v1/completions", json={"model": "trident", "prompt": 42}), 400, "prompt"
    )
    _assert_error(client.post("/v1/completions", json={"model": "trident"}), 400, "prompt")


def test_generation_without_triton_is_503(client: TestClient) -> None:
    for stream in (False, True):
        err = _assert_error(
            client.post("/v1/chat/completions", json={**CHAT, "stream": stream}), 503
        )
        assert err["type"] == "service_unavailable_error"
    _assert_error(
        client.post("/v1/completions", json={"model": "trident", "prompt": ["a", "b"]}), 503
    )


def test_health_is_503_without_triton(client: TestClient) -> None:
    resp = client.get("/health")
    assert resp.status_code == 503
    assert resp.json()["status"] == "not_ready" and resp.json()["router"] is False
    assert client.get("/health/live").status_code == 200


def test_unknown_route_has_openai_error_shape(client: TestClient) -> None:
    _assert_error(client.get("/v1/nothing"), 404)
    _assert_error(client.get("/v1/chat/completions"), 405)


def test_api_key_is_required_on_v1_routes(keyed: TestClient) -> None:
    for headers in (
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": KEY},
        {"Authorization": f"Basic {KEY}"},
    ):
        err = _assert_error(keyed.get("/v1/models", headers=headers), 401)
        assert err["type"] == "authentication_error"
        _assert_error(keyed.post("/v1/chat/completions", json=CHAT, headers=headers), 401)
    ok = {"Authorization": f"Bearer {KEY}"}
    assert keyed.get("/v1/models", headers=ok).status_code == 200
    # Past the key check the request reaches validation, then the (absent) router.
    _assert_error(
        keyed.post("/v1/chat/completions", json={**CHAT, "top_p": 3}, headers=ok), 400, "top_p"
    )
    _assert_error(keyed.post("/v1/chat/completions", json=CHAT, headers=ok), 503)
    # Health and metrics stay open for probes and scrapers.
    assert keyed.get("/metrics").status_code == 200
    assert keyed.get("/health").status_code == 503


def test_metrics_count_requests_by_status(client: TestClient) -> None:
    client.post("/v1/chat/completions", json={**CHAT, "model": "nope"})
    client.post("/v1/chat/completions", content=b"{")
    text = client.get("/metrics").text
    assert 'trident_frontend_requests_total{endpoint="chat_completions",status="404"} 1.0' in text
    assert 'trident_frontend_requests_total{endpoint="chat_completions",status="400"} 1.0' in text
    assert 'trident_frontend_inflight_requests{endpoint="chat_completions"} 0.0' in text
