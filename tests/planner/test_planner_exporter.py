"""The planner's own /metrics (planner.exporter): a real `PlannerLoop` takes decisions from
scrapes of Trident's exposition, and the exporter's HTTP server reports them."""

from __future__ import annotations

import threading
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from planner.config import PlannerConfig
from planner.connectors.advisory import AdvisoryConnector
from planner.exporter import FAMILIES, PlannerExporter, render
from planner.loop import PlannerLoop
from planner.metrics import parse
from tests.metrics_catalogue import catalogue, families
from tests.planner.test_planner_metrics import Worker, scrape_at
from trident.core.errors import ConfigError

CONFIG = PlannerConfig(connector="advisory", up_cooldown_s=0.0, max_decode=4, budget=4)


@pytest.fixture
def loop() -> Iterator[PlannerLoop]:
    replicas = {"decode": ("decode",)}
    loop = PlannerLoop(
        CONFIG, AdvisoryConnector(lambda: replicas), lambda t: scrape_at(t, {}), budget=4
    )
    yield loop
    loop.connector.close()


def get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.headers["Content-Type"], resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, "", ""


def test_exporter_reports_replicas_targets_and_decisions(loop: PlannerLoop) -> None:
    exporter = PlannerExporter(loop, "127.0.0.1", 0).start()
    try:
        url = f"http://127.0.0.1:{exporter.port}"
        status, _, empty = get(url + "/metrics")
        assert status == 200
        assert 'trident_planner_decisions_total{pool="decode",direction="up"} 0' in empty
        assert "trident_planner_replicas{" not in empty  # no decision yet
        # mean TTFT 5 s against a 1 s target: the decode pool grows
        slow = [
            scrape_at(0.0, {"decode": Worker(ttft=(0, 0.0))}),
            scrape_at(5.0, {"decode": Worker(ttft=(10, 50.0))}),
        ]
        record = loop.step(slow)
        assert record.decision.targets["decode"] == 2
        status, content_type, text = get(url + "/metrics")
        assert status == 200 and content_type.startswith("text/plain; version=0.0.4")
        assert 'trident_planner_decisions_total{pool="decode",direction="up"} 1' in text
        assert 'trident_planner_decisions_total{pool="decode",direction="hold"} 0' in text
        assert 'trident_planner_replicas{pool="decode"} 1' in text
        assert 'trident_planner_target_replicas{pool="decode"} 2' in text
        families = {n for n, _ in parse(text, 0.0).samples}
        assert "trident_planner_observed_request_rate" in families
        assert get(url + "/other")[0] == 404
    finally:
        exporter.stop()
        exporter.stop()


def test_exporter_stops_cleanly_when_never_started(loop: PlannerLoop) -> None:
    done = threading.Event()
    exporter = PlannerExporter(loop, "127.0.0.1", 0)
    threading.Thread(target=lambda: (exporter.stop(), done.set()), daemon=True).start()
    assert done.wait(5)


def test_a_taken_port_is_a_config_error(loop: PlannerLoop) -> None:
    first = PlannerExporter(loop, "127.0.0.1", 0)
    try:
        with pytest.raises(ConfigError, match="exporter_port"):
            PlannerExporter(loop, "127.0.0.1", first.port)
    finally:
        first.stop()


def test_exporter_families_are_catalogued() -> None:
    entries = catalogue()
    exposed = families(render([], CONFIG.pools))
    assert set(exposed) == set(FAMILIES)
    for name, (kind, _) in FAMILIES.items():
        assert entries[name].kind == kind and entries[name].emitter == "planner", name
    planner_rows = {n for n, e in entries.items() if e.emitter == "planner"}
    assert planner_rows == set(FAMILIES)
