"""The web console (/console) in a real browser: headless Debian chromium, driven over the
DevTools protocol (tests/frontend/devtools.py), against the real frontend (with an API key) in
front of the session's tritonserver. The page loads without console errors, the cluster view
lists the running workers, a chat message streams an answer with its TTFT, tokens/s, cached
tokens and workers; a screenshot is written to the test's tmp dir."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from frontend.main import BackgroundFrontend
from tests.frontend.conftest import API_KEY, start_frontend
from tests.frontend.devtools import Browser
from tests.integration.server_fixture import ServerInfo

logger = logging.getLogger(__name__)


ANSWER = (
    "(() => { const a = document.querySelector('.msg.assistant');"
    " return a && {text: a.querySelector('.content').textContent,"
    " stats: a.querySelector('.stats').textContent, chunks: Number(a.dataset.chunks || 0)}; })()"
)


@pytest.fixture(scope="module")
def console_frontend(triton_server: ServerInfo) -> Iterator[BackgroundFrontend]:
    frontend = start_frontend(
        triton_server, api_key=API_KEY, triton_metrics_url=triton_server.metrics_url
    )
    try:
        yield frontend
    finally:
        frontend.stop()


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Browser]:
    b = Browser.start(tmp_path)
    try:
        yield b
    finally:
        b.close()


def test_console_routes_follow_the_api_key_rule(
    console_frontend: BackgroundFrontend, triton_server: ServerInfo
) -> None:
    base = console_frontend.base_url
    page = httpx.get(f"{base}/console", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert (
        "http://" not in page.text and "https://" not in page.text
    )  # nothing fetched from elsewhere
    for name in ("console.js", "console.css"):
        assert httpx.get(f"{base}/console/static/{name}", timeout=10).status_code == 200
    assert httpx.get(f"{base}/console/static/..%2Fapp.py", timeout=10).status_code == 404
    assert httpx.get(f"{base}/console/static/app.py", timeout=10).status_code == 404
    assert httpx.get(f"{base}/console/api/cluster", timeout=10).status_code == 401
    view = httpx.get(
        f"{base}/console/api/cluster", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10
    ).json()
    assert view["router_ready"] and view["error"] is None, view
    decode = {w["name"]: w for w in view["roles"]["decode"]}
    assert set(decode) == set(triton_server.decode_models)
    assert all(w["ready"] and w["kv_capacity"] > 0 for w in decode.values()), decode


def test_console_chats_and_shows_the_cluster_in_chromium(
    console_frontend: BackgroundFrontend,
    triton_server: ServerInfo,
    browser: Browser,
    tmp_path: Path,
) -> None:
    for domain in ("Runtime", "Log", "Page"):
        browser.call(f"{domain}.enable")
    browser.call(
        "Page.addScriptToEvaluateOnNewDocument",
        source=f"sessionStorage.setItem('trident-api-key', {json.dumps(API_KEY)});",
    )
    browser.call(
        "Emulation.setDeviceMetricsOverride",
        width=1400,
        height=900,
        deviceScaleFactor=1,
        mobile=False,
    )
    browser.call("Page.navigate", url=f"{console_frontend.base_url}/console")
    browser.wait_for("document.readyState === 'complete'", timeout_s=30)
    # the cluster view lists the running workers, by role
    shown = browser.wait_for(
        "(() => { const r = [...document.querySelectorAll('.worker-row')].map(e => e.dataset.worker);"
        " return r.length ? r : null; })()",
        timeout_s=30,
    )
    assert set(triton_server.decode_models) <= set(shown), shown
    assert browser.wait_for("document.getElementById('model').options.length", timeout_s=15) >= 1
    # a chat message streams an answer
    browser.evaluate(
        "(() => { document.getElementById('max-tokens').value = '40';"
        " document.getElementById('temperature').value = '0';"
        " document.getElementById('chat-input').value = 'Write one sentence about the sea.';"
        " document.getElementById('chat-form').requestSubmit(); })()"
    )
    done = "document.querySelector('.msg.assistant')?.dataset.done"
    state = browser.wait_for(done, timeout_s=120, interval_s=0.2, describe=ANSWER)
    answer = browser.evaluate(
        "(() => { const a = document.querySelector('.msg.assistant');"
        " return {text: a.querySelector('.content').textContent, stats: a.querySelector('.stats').textContent,"
        " chunks: Number(a.dataset.chunks || 0)}; })()"
    )
    assert state == "true", answer
    assert answer["text"].strip(), answer
    assert answer["chunks"] > 1, answer  # streamed, not one block
    stats = answer["stats"]
    assert "TTFT" in stats and "tokens/s" in stats and "cached" in stats, stats
    assert "served by " in stats and any(w in stats for w in triton_server.decode_models), stats
    # the worker that served the answer shows its recent TTFT (the others have none yet)
    browser.wait_for(
        "[...document.querySelectorAll('.worker-row td:last-child')].some(c => c.textContent.endsWith('ms'))",
        timeout_s=15,
        describe="[...document.querySelectorAll('.worker-row')].map(r => r.textContent)",
    )
    shot = browser.screenshot(tmp_path / "console.png")
    logger.info("console screenshot: %s", shot)
    assert shot.stat().st_size > 10_000
    browser.drain_events()
    assert browser.errors() == []
