"""The Prometheus text exposition written by frontend.metrics."""

from __future__ import annotations

from frontend.metrics import Counter, FrontendMetrics, Histogram


def test_histogram_buckets_are_cumulative() -> None:
    h = Histogram("lat_seconds", "latency", (0.1, 1.0), ("model",))
    h.observe(0.05, "m")
    h.observe(0.5, "m", count=2)
    h.observe(5.0, "m")
    lines = h.render()
    assert 'lat_seconds_bucket{model="m",le="0.1"} 1' in lines
    assert 'lat_seconds_bucket{model="m",le="1.0"} 3' in lines
    assert 'lat_seconds_bucket{model="m",le="+Inf"} 4' in lines
    assert 'lat_seconds_count{model="m"} 4' in lines
    assert 'lat_seconds_sum{model="m"} 6.05' in lines
    assert "# TYPE lat_seconds histogram" in lines


def test_counter_and_escaping() -> None:
    c = Counter("reqs", "requests", ("endpoint",))
    c.inc('a"b')
    assert 'reqs_total{endpoint="a\\"b"} 1.0' in c.render()
    assert "# TYPE reqs_total counter" in c.render()


def test_frontend_metrics_render_every_family() -> None:
    text = FrontendMetrics().render()
    for family in (
        "trident_frontend_requests_total",
        "trident_frontend_inflight_requests",
        "trident_frontend_time_to_first_token_seconds",
        "trident_frontend_inter_token_latency_seconds",
    ):
        assert f"# TYPE {family} " in text
    assert text.endswith("\n")
