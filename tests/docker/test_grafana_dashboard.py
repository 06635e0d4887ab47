"""docker/grafana: the dashboard's JSON and PromQL, its provisioning by compose.yaml (the
`monitoring` profile) and by the Kubernetes ConfigMap, which must be current.

That every queried metric exists on a running server: tests/frontend/test_metrics_catalogue.py
(server, frontend, planner exporter), tests/integration/test_kv_tiers_serving.py (tier metrics)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from tests.docker.deployment_files import COMPOSE, DOCKER, K8S, ROOT, find, load_manifests
from tests.metrics_catalogue import (
    DASHBOARD,
    catalogue,
    dashboard_families,
    dashboard_queries,
    promql_series,
)

GRAFANA = DOCKER / "grafana"
# what the dashboard must show (issue: panels), each as a family it must query
REQUIRED = {
    "trident_time_to_first_token_seconds",
    "trident_inter_token_latency_seconds",
    "trident_requests_total",
    "trident_generation_tokens_total",
    "trident_kv_blocks_used",
    "trident_kv_tier_blocks",
    "trident_router_cache_hit_ratio",
    "trident_kv_tier_hit_blocks_total",
    "trident_router_decisions_total",
    "trident_router_decision_seconds",
    "trident_planner_replicas",
    "trident_planner_decisions_total",
    "trident_router_migrations_total",
}


def test_promql_series_are_extracted() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (worker, le) (rate(a_seconds_bucket{x="y}"}[5m])))'
        " / on (worker) group_left b_total unless c"
    )
    assert promql_series(expr) == {"a_seconds_bucket", "b_total", "c"}
    with pytest.raises(ValueError, match="unbalanced"):
        promql_series("sum(rate(a_total[1m])))")
    with pytest.raises(ValueError, match="unclosed"):
        promql_series("sum(rate(a_total[1m])")


def test_every_query_parses_and_names_catalogued_metrics() -> None:
    entries = catalogue()
    queries = dashboard_queries()
    assert len(queries) >= 20
    for title, expr in queries:
        series = promql_series(expr)
        assert series, f"{title}: {expr!r} selects nothing"
        for name in series:
            family = name.removesuffix("_bucket")
            if name.endswith("_bucket"):
                assert entries[family].kind == "histogram", f"{title}: {name}"
            else:
                assert name in entries, f"{title}: {name} is not in docs/metrics.md"
                assert entries[name].kind != "histogram", f"{title}: {name} needs _bucket"
    assert REQUIRED <= dashboard_families()


def test_panels_use_the_datasource_variable_and_unique_ids() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]


def test_compose_provisions_prometheus_and_grafana() -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert "profiles" not in services["trident"], "monitoring stays opt-in"
    for name in ("prometheus", "grafana"):
        assert services[name]["profiles"] == ["monitoring"]
        assert ":" in services[name]["image"] and not services[name]["image"].endswith(":latest")
        for volume in services[name]["volumes"]:
            assert (COMPOSE.parent / volume["source"]).exists(), volume
            assert volume["read_only"] is True
    mounts = {v["target"]: COMPOSE.parent / v["source"] for v in services["grafana"]["volumes"]}
    assert mounts["/var/lib/grafana/dashboards"].resolve() == DASHBOARD.parent
    provider = yaml.safe_load((GRAFANA / "provisioning/dashboards/trident.yaml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    source = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yaml").read_text())
    assert source["datasources"][0]["url"] == "http://prometheus:9090"
    prometheus = next(v for v in services["prometheus"]["volumes"])
    config = yaml.safe_load((COMPOSE.parent / prometheus["source"]).read_text())
    targets = {
        t for job in config["scrape_configs"] for s in job["static_configs"] for t in s["targets"]
    }
    ports = {str(p).rsplit(":", 1)[1] for p in services["trident"]["ports"]}
    assert targets == {"trident:8002", "trident:9000"} and {"8002", "9000"} <= ports


def test_kubernetes_configmap_holds_the_dashboard_and_is_current() -> None:
    run = subprocess.run(
        [sys.executable, str(GRAFANA / "configmap.py"), "--check"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert run.returncode == 0, run.stderr
    (configmap,) = find(load_manifests(K8S), "ConfigMap", "trident-grafana-dashboard")
    assert configmap.doc["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert configmap.doc["data"]["trident.json"] == DASHBOARD.read_text()
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert configmap.path.name in kustomization["resources"]
