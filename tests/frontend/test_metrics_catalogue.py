"""docs/metrics.md against the running stack: every `trident_*` family that the session's
tritonserver (router + two decode workers) and the real frontend expose is in the catalogue with
the same type, labels and emitter, and every entry that should be there after a request is.
The Grafana dashboard's queries (docker/grafana) are checked against the same scrapes, plus
the planner's exporter after a decision taken from this server's /metrics."""

from __future__ import annotations

import httpx

from planner.config import PlannerConfig
from planner.connectors.advisory import AdvisoryConnector
from planner.exporter import PlannerExporter
from planner.loop import PlannerLoop
from planner.metrics import scrape
from tests.frontend.conftest import MODEL_ID
from tests.integration.server_fixture import ServerInfo
from tests.metrics_catalogue import Family, catalogue, dashboard_families, families

PRESENT_AFTER_A_REQUEST = ("always", "after a request")
# conditions this server does not meet, and the test that sees those metrics on a server
CHECKED_ELSEWHERE = {
    "KV tiers": "tests/integration/test_kv_tiers_serving.py",
    "a migration": "tests/integration/test_faults.py",
    "a client disconnect": "tests/frontend/test_e2e_http.py",
    "an SLA decision": "tests/planner/test_planner_exporter.py (the families; samples need a profile)",
}


def compare(exposed: dict[str, Family], emitters: tuple[str, ...]) -> list[str]:
    entries = catalogue()
    problems = []
    for name, family in sorted(exposed.items()):
        entry = entries.get(name)
        if entry is None:
            problems.append(f"{name}: exposed but not in docs/metrics.md")
            continue
        if entry.emitter not in emitters:
            problems.append(f"{name}: the catalogue says {entry.emitter} emits it")
        if family.kind != entry.kind:
            problems.append(f"{name}: exposed as {family.kind}, catalogued as {entry.kind}")
        if family.samples and family.labels != entry.labels:
            problems.append(
                f"{name}: labels {sorted(family.labels)}, catalogued {sorted(entry.labels)}"
            )
    for name, entry in sorted(entries.items()):
        if entry.emitter in emitters and entry.when in PRESENT_AFTER_A_REQUEST:
            if name not in exposed or not exposed[name].samples:
                problems.append(f"{name}: catalogued ({entry.when}) but not exposed")
    return problems


def test_catalogue_rows_parse() -> None:
    entries = catalogue()
    assert len(entries) >= 40
    assert {e.kind for e in entries.values()} == {"counter", "gauge", "histogram"}
    for name, entry in entries.items():
        assert (entry.kind == "counter") == name.endswith("_total"), name
        if entry.kind == "histogram":
            assert name.endswith("_seconds"), name


def test_catalogue_matches_the_running_server_and_frontend(
    triton_server: ServerInfo, base_url: str
) -> None:
    body = {
        "model": MODEL_ID,
        "messages": [{"role": "user", "content": "Name a colour."}],
        "max_tokens": 4,
        "stream": True,
    }
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        assert any(line.startswith("data: [DONE]") for line in r.iter_lines())
    server = families(httpx.get(triton_server.metrics_url, timeout=10).text)
    frontend = families(httpx.get(f"{base_url}/metrics", timeout=10).text)
    assert set(server) & set(frontend) == set()
    problems = compare(server, ("worker", "router")) + compare(frontend, ("frontend",))
    assert not problems, "\n".join(problems)
    # the check can fail: an exposed family the catalogue lacks is reported
    extra = {**frontend, "trident_frontend_made_up_total": Family("counter", frozenset(), 1)}
    assert compare(extra, ("frontend",)) == [
        "trident_frontend_made_up_total: exposed but not in docs/metrics.md"
    ]


def chat(base_url: str, content: str) -> dict:
    body = {"model": MODEL_ID, "messages": [{"role": "user", "content": content}], "max_tokens": 4}
    r = httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def test_every_metric_the_dashboard_queries_is_exposed(
    triton_server: ServerInfo, base_url: str
) -> None:
    prompt = "Describe the sea in one sentence. " * 12  # a few full blocks: the second is a hit
    usages = [chat(base_url, prompt)["usage"] for _ in range(2)]
    assert usages[1]["prompt_tokens_details"]["cached_tokens"] > 0, usages
    config = PlannerConfig(connector="advisory")
    loop = PlannerLoop(
        config,
        AdvisoryConnector(lambda: {"decode": triton_server.decode_models}),
        lambda t: scrape(triton_server.metrics_url, t),
        budget=4,
    )
    loop.step([loop.read_metrics(0.0), loop.read_metrics(1.0)])
    exporter = PlannerExporter(loop, "127.0.0.1", 0).start()
    try:
        planner = families(httpx.get(f"http://127.0.0.1:{exporter.port}/metrics", timeout=10).text)
    finally:
        exporter.stop()
        loop.connector.close()
    live = {
        **families(httpx.get(triton_server.metrics_url, timeout=10).text),
        **families(httpx.get(f"{base_url}/metrics", timeout=10).text),
        **planner,
    }
    entries = catalogue()
    queried = dashboard_families()
    missing = sorted(n for n in queried if n not in live or not live[n].samples)
    elsewhere = [n for n in missing if entries[n].when in CHECKED_ELSEWHERE]
    assert missing == elsewhere, (
        f"queried by the dashboard, not exposed: {set(missing) - set(elsewhere)}"
    )
    assert len(queried) - len(missing) >= 25
