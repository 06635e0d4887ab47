"""Reading Triton's `/metrics` (`planner.metrics`): Prometheus text as the server exports it
(the worker families of `plugins.triton.metrics`, the router's of
`router_ensemble.triton.metrics_exporter`, Triton's own `nv_*` lines) parsed into scrapes,
and scrapes turned into the core's `Window`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import pytest

from planner.metrics import Scrape, inflight, parse, window_between
from plugins.triton.metrics import ITL_BUCKETS, TTFT_BUCKETS

TTFT = "trident_time_to_first_token_seconds"
ITL = "trident_inter_token_latency_seconds"


@dataclass(frozen=True)
class Worker:
    """What one worker model exports at one scrape (counters are totals since it loaded)."""

    ttft: tuple[int, float] = (0, 0.0)  # (count, sum of seconds)
    itl: tuple[int, float] = (0, 0.0)
    requests: float = 0
    prompt: float = 0
    generated: float = 0
    running: float = 0
    waiting: float = 0
    inflight: float = 0
    prefill_active: float = 0
    kv_used: float = 0
    kv_total: float = 64
    held: float = 0


@dataclass(frozen=True)
class Router:
    """The router model's counters: decisions per (pool, worker), served tokens per pool."""

    decisions: Mapping[tuple[str, str], float]
    prompt: Mapping[str, float]
    cached: Mapping[str, float]


def _family(out: list[str], name: str, kind: str, help_text: str) -> None:
    out += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]


def _labels(**labels: str) -> str:
    return "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}"


def _histogram(out: list[str], name: str, buckets: list[float], workers: Mapping[str, tuple[int, float]]) -> None:
    _family(out, name, "histogram", "latency")
    for worker, (count, total) in workers.items():
        mean = total / count if count else 0.0
        out.append(f"{name}_count{_labels(worker=worker)} {count}")
        out.append(f"{name}_sum{_labels(worker=worker)} {total}")
        for le in buckets:  # every observation at the mean: cumulative counts jump there
            out.append(f"{name}_bucket{_labels(worker=worker, le=str(le))} {count if count and mean <= le else 0}")
        out.append(f"{name}_bucket{_labels(worker=worker, le='+Inf')} {count}")


def exposition(workers: Mapping[str, Worker], router: Router | None = None) -> str:
    """`/metrics` text: each family once (HELP, TYPE, then one sample per worker)."""
    out: list[str] = []
    _family(out, "nv_inference_request_success", "counter", "Number of successful inference requests")
    for model in ("router", *workers):
        out.append(f'nv_inference_request_success{{model="{model}",version="1"}} 3')
    _histogram(out, TTFT, TTFT_BUCKETS, {w: v.ttft for w, v in workers.items()})
    _histogram(out, ITL, ITL_BUCKETS, {w: v.itl for w, v in workers.items()})
    scalars = [
        ("trident_requests_total", "counter", "requests"),
        ("trident_prompt_tokens_total", "counter", "prompt"),
        ("trident_generation_tokens_total", "counter", "generated"),
        ("trident_kv_blocks_used", "gauge", "kv_used"),
        ("trident_kv_blocks_capacity", "gauge", "kv_total"),
        ("trident_requests_running", "gauge", "running"),
        ("trident_requests_waiting", "gauge", "waiting"),
        ("trident_requests_inflight", "gauge", "inflight"),
        ("trident_prefill_tokens_active", "gauge", "prefill_active"),
        ("trident_kv_blocks_held", "gauge", "held"),
    ]
    for name, kind, attr in scalars:
        _family(out, name, kind, attr)
        out += [f"{name}{_labels(worker=w)} {getattr(v, attr)}" for w, v in workers.items()]
    if router is not None:
        _family(out, "trident_router_decisions_total", "counter", "Requests routed to each worker")
        for (pool, worker), n in router.decisions.items():
            out.append(f"trident_router_decisions_total{_labels(router='router', pool=pool, worker=worker, policy='kv')} {n}")
        for name, values in (("trident_router_prompt_tokens_total", router.prompt),
                             ("trident_router_cached_tokens_total", router.cached)):
            _family(out, name, "counter", "served tokens")
            out += [f"{name}{_labels(router='router', pool=pool)} {n}" for pool, n in values.items()]
        _family(out, "trident_router_cache_hit_ratio", "gauge", "hit rate")
        out.append(f"trident_router_cache_hit_ratio{_labels(router='router', pool='decode', kind='served')} 0.25")
        _family(out, "trident_router_live_workers", "gauge", "live workers")
        out.append(f"trident_router_live_workers{_labels(router='router', pool='decode')} {len(workers)}")
    return "\n".join(out) + "\n"


def scrape_at(t: float, workers: Mapping[str, Worker], router: Router | None = None) -> Scrape:
    return parse(exposition(workers, router), t)


def router(decode: float, decode_1: float = 0, prefill: float = 0, prompt: float = 0, cached: float = 0) -> Router:
    return Router({("decode", "decode"): decode, ("decode", "decode_1"): decode_1, ("prefill", "prefill"): prefill},
                  {"decode": prompt}, {"decode": cached})


# ---- parse / Scrape -----------------------------------------------------------------------
def test_parse_keys_samples_by_name_and_sorted_labels() -> None:
    s = scrape_at(7.0, {"decode": Worker(ttft=(4, 0.8), requests=12, running=3)})
    assert s.t == 7.0
    assert s.samples[("trident_requests_total", (("worker", "decode"),))] == 12.0
    assert s.samples[(f"{TTFT}_sum", (("worker", "decode"),))] == pytest.approx(0.8)
    assert s.samples[(f"{TTFT}_bucket", (("le", "+Inf"), ("worker", "decode")))] == 4.0
    assert s.value("trident_requests_running") == 3  # Triton's own nv_* lines parse alongside


def test_parse_keeps_every_router_label() -> None:
    s = scrape_at(0.0, {"decode": Worker()}, router(10))
    labels = (("policy", "kv"), ("pool", "decode"), ("router", "router"), ("worker", "decode"))
    assert s.samples[("trident_router_decisions_total", labels)] == 10.0
    assert s.samples[("trident_router_prompt_tokens_total", (("pool", "decode"), ("router", "router")))] == 0.0


def test_value_sums_the_samples_whose_labels_include_the_given_ones() -> None:
    s = scrape_at(0.0, {"decode": Worker(running=2), "decode_1": Worker(running=5)}, router(10, 8, prefill=5))
    assert s.value("trident_requests_running", worker="decode_1") == 5
    assert s.value("trident_requests_running") == 7
    assert s.value("trident_router_decisions_total", pool="decode") == 18
    assert s.value("trident_router_decisions_total", pool="decode", worker="decode_1", policy="kv") == 8
    assert s.value("trident_router_decisions_total") == 23
    assert s.value(f"{TTFT}_bucket", worker="decode", le="+Inf") == 0
    assert s.value("trident_requests_running", worker="nobody") == 0
    assert s.value("no_such_metric") == 0


def test_workers_are_those_exporting_the_running_gauge() -> None:
    s = scrape_at(0.0, {"decode": Worker(), "decode_1": Worker(), "prefill": Worker()}, router(1, 1, 1))
    assert s.workers() == {"decode", "decode_1", "prefill"}  # not `router`, not the router's worker labels


def test_inflight_adds_requests_held_and_kv_blocks_leased() -> None:
    s = scrape_at(0.0, {"decode": Worker(inflight=3), "prefill": Worker(inflight=1, held=6), "decode_1": Worker()})
    assert inflight(s, "decode") == 3
    assert inflight(s, "prefill") == 7
    assert inflight(s, "decode_1") == 0
    assert inflight(s, "decode_9") is None  # no gauge (not started, or gone): never reads as drained


# ---- window_between -----------------------------------------------------------------------
def test_window_needs_two_scrapes() -> None:
    one = scrape_at(0.0, {"decode": Worker()})
    with pytest.raises(ValueError, match="at least two scrapes"):
        window_between([one])
    with pytest.raises(ValueError):
        window_between([])


def test_latency_means_come_from_sum_and_count_differences() -> None:
    before = {"decode": Worker(ttft=(10, 2.0), itl=(1000, 40.0)), "decode_1": Worker(ttft=(5, 5.0), itl=(10, 1.0))}
    after = {"decode": Worker(ttft=(14, 2.8), itl=(1500, 65.0)), "decode_1": Worker(ttft=(5, 5.0), itl=(10, 1.0))}
    w = window_between([scrape_at(100.0, before), scrape_at(105.0, after)])
    assert w.duration_s == pytest.approx(5.0)
    decode, decode_1 = w.pool("decode").workers
    assert decode.worker == "decode" and decode_1.worker == "decode_1"
    assert decode.ttft_s == pytest.approx(0.8 / 4) and decode.first_tokens == 4
    assert decode.itl_s == pytest.approx(25.0 / 500) and decode.tokens == 500
    assert decode_1.ttft_s is None and decode_1.itl_s is None  # nothing new in the window
    assert decode_1.first_tokens == 0 and decode_1.tokens == 0


def test_gauges_are_averaged_over_the_scrapes_after_the_first() -> None:
    scrapes = [
        scrape_at(0.0, {"decode": Worker(running=100, waiting=100, prefill_active=1e6, kv_used=64, kv_total=64)}),
        scrape_at(1.0, {"decode": Worker(running=2, waiting=1, prefill_active=300, kv_used=16, kv_total=64)}),
        scrape_at(2.0, {"decode": Worker(running=4, waiting=0, prefill_active=100, kv_used=32, kv_total=64)}),
        scrape_at(3.0, {"decode": Worker(running=6, waiting=2, prefill_active=200, kv_used=48, kv_total=64)}),
    ]
    (load,) = window_between(scrapes).pool("decode").workers
    assert load.running == pytest.approx(4.0)
    assert load.waiting == pytest.approx(1.0)
    assert load.active == pytest.approx(5.0)
    assert load.active_prefill_tokens == pytest.approx(200.0)
    assert load.kv_usage == pytest.approx(0.5)


def test_kv_usage_is_zero_when_the_pool_size_is_unknown() -> None:
    scrapes = [scrape_at(0.0, {"decode": Worker(kv_used=5, kv_total=0)}),
               scrape_at(1.0, {"decode": Worker(kv_used=5, kv_total=0)})]
    assert window_between(scrapes).pool("decode").workers[0].kv_usage == 0.0


def test_workers_are_grouped_by_pool_from_their_replica_names() -> None:
    workers = {"decode": Worker(), "decode_1": Worker(), "prefill": Worker(), "prefill_2": Worker()}
    w = window_between([scrape_at(0.0, workers), scrape_at(1.0, workers)])
    assert set(w.pools) == {"decode", "prefill"}
    assert [x.worker for x in w.pool("decode").workers] == ["decode", "decode_1"]
    assert [x.worker for x in w.pool("prefill").workers] == ["prefill", "prefill_2"]


def test_arrivals_come_from_the_routers_decode_decisions() -> None:
    before = {"decode": Worker(ttft=(10, 1.0)), "decode_1": Worker(ttft=(10, 1.0)), "prefill": Worker(ttft=(3, 0.3))}
    after = {"decode": Worker(ttft=(12, 1.2)), "decode_1": Worker(ttft=(11, 1.1)), "prefill": Worker(ttft=(9, 0.9))}
    w = window_between([scrape_at(0.0, before, router(100, 90, prefill=20)),
                        scrape_at(4.0, after, router(112, 98, prefill=60))])
    # 12 + 8 decode decisions in 4 s; the prefill pool's decisions and first tokens do not count
    assert w.request_rate == pytest.approx(20 / 4)


def test_arrivals_fall_back_to_decode_first_tokens_without_the_router_family() -> None:
    before = {"decode": Worker(ttft=(10, 1.0)), "decode_1": Worker(ttft=(10, 1.0)), "prefill": Worker(ttft=(3, 0.3))}
    after = {"decode": Worker(ttft=(16, 1.6)), "decode_1": Worker(ttft=(12, 1.2)), "prefill": Worker(ttft=(9, 0.9))}
    w = window_between([scrape_at(0.0, before), scrape_at(2.0, after)])
    assert w.request_rate == pytest.approx((6 + 2) / 2)


def test_input_and_output_lengths_are_per_decode_request() -> None:
    before = {"decode": Worker(ttft=(10, 1.0), prompt=1000, requests=9, generated=900),
              "decode_1": Worker(ttft=(0, 0.0)),
              "prefill": Worker(ttft=(50, 5.0), prompt=99_999, requests=50, generated=50)}
    after = {"decode": Worker(ttft=(13, 1.3), prompt=1600, requests=11, generated=1100),
             "decode_1": Worker(ttft=(1, 0.1), prompt=200, requests=2, generated=300),
             "prefill": Worker(ttft=(60, 6.0), prompt=199_999, requests=60, generated=60)}
    w = window_between([scrape_at(0.0, before), scrape_at(1.0, after)])
    assert w.input_tokens == pytest.approx((600 + 200) / (3 + 1))  # prompt tokens per first token
    assert w.output_tokens == pytest.approx((200 + 300) / (2 + 2))  # generated per finished request


def test_lengths_are_zero_when_nothing_started_or_finished() -> None:
    workers = {"decode": Worker(ttft=(3, 0.3), prompt=30, requests=3, generated=90)}
    w = window_between([scrape_at(0.0, workers), scrape_at(1.0, workers)])
    assert w.input_tokens == 0.0 and w.output_tokens == 0.0 and w.request_rate == 0.0


def test_prefix_hit_rate_is_served_cached_over_prompt_tokens() -> None:
    workers = {"decode": Worker()}
    w = window_between([scrape_at(0.0, workers, router(0, prompt=1000, cached=100)),
                        scrape_at(1.0, workers, router(4, prompt=1800, cached=400))])
    assert w.prefix_hit_rate == pytest.approx(300 / 800)
    same = window_between([scrape_at(0.0, workers, router(0, prompt=1000, cached=100)),
                           scrape_at(1.0, workers, router(0, prompt=1000, cached=100))])
    assert same.prefix_hit_rate == 0.0  # nothing served in the window


def test_serving_filter_leaves_out_a_draining_worker() -> None:
    before = {"decode": Worker(ttft=(0, 0.0)), "decode_1": Worker(ttft=(0, 0.0)), "prefill": Worker()}
    after = {"decode": Worker(ttft=(4, 0.4), prompt=400, running=2),
             "decode_1": Worker(ttft=(6, 6.0), prompt=6000, running=9), "prefill": Worker()}
    scrapes = [scrape_at(0.0, before), scrape_at(1.0, after)]
    w = window_between(scrapes, serving={"decode": ["decode"], "prefill": ["prefill"]})
    assert [x.worker for x in w.pool("decode").workers] == ["decode"]
    assert w.pool("decode").ttft_s == pytest.approx(0.1)
    assert w.input_tokens == pytest.approx(100.0)  # decode_1's long prompts are not in the mean
    assert w.request_rate == pytest.approx(4.0)  # fallback: the serving decode worker's first tokens
    assert [x.worker for x in w.pool("prefill").workers] == ["prefill"]
    unfiltered = window_between(scrapes)
    assert [x.worker for x in unfiltered.pool("decode").workers] == ["decode", "decode_1"]


def test_serving_filter_drops_a_pool_it_does_not_name() -> None:
    workers = {"decode": Worker(), "prefill": Worker()}
    w = window_between([scrape_at(0.0, workers), scrape_at(1.0, workers)], serving={"decode": {"decode"}})
    assert set(w.pools) == {"decode"}


def test_a_counter_that_went_down_counts_from_zero() -> None:
    """decode_1 was reloaded during the window: its counters restarted."""
    before = {"decode": Worker(ttft=(10, 1.0), itl=(100, 5.0), requests=10, prompt=1000, generated=500),
              "decode_1": Worker(ttft=(40, 8.0), itl=(4000, 200.0), requests=40, prompt=4000, generated=2000)}
    after = {"decode": Worker(ttft=(12, 1.2), itl=(200, 10.0), requests=12, prompt=1200, generated=600),
             "decode_1": Worker(ttft=(2, 0.6), itl=(50, 3.0), requests=1, prompt=300, generated=80)}
    w = window_between([scrape_at(0.0, before, router(10, 40)), scrape_at(2.0, after, router(12, 42))])
    _, reloaded = w.pool("decode").workers
    assert reloaded.first_tokens == 2 and reloaded.ttft_s == pytest.approx(0.3)
    assert reloaded.tokens == 50 and reloaded.itl_s == pytest.approx(0.06)
    assert w.input_tokens == pytest.approx((200 + 300) / (2 + 2))
    assert w.output_tokens == pytest.approx((100 + 80) / (2 + 1))


def test_a_router_counter_reset_counts_from_zero() -> None:
    workers = {"decode": Worker()}
    w = window_between([scrape_at(0.0, workers, router(500, prompt=9000, cached=3000)),
                        scrape_at(2.0, workers, router(6, prompt=400, cached=100))])
    assert w.request_rate == pytest.approx(6 / 2)
    assert w.prefix_hit_rate == pytest.approx(100 / 400)


def test_a_worker_only_in_the_last_scrape_counts_from_zero() -> None:
    before = {"decode": Worker(ttft=(10, 1.0), prompt=1000)}
    after = {"decode": Worker(ttft=(10, 1.0), prompt=1000),
             "decode_1": Worker(ttft=(3, 0.9), itl=(30, 1.5), prompt=600, requests=2, generated=40, running=1)}
    w = window_between([scrape_at(0.0, before), scrape_at(1.0, after)])
    assert [x.worker for x in w.pool("decode").workers] == ["decode", "decode_1"]
    new = w.pool("decode").workers[1]
    assert new.first_tokens == 3 and new.ttft_s == pytest.approx(0.3)
    assert new.tokens == 30 and new.itl_s == pytest.approx(0.05)
    assert new.running == 1
    assert w.input_tokens == pytest.approx(200.0) and w.output_tokens == pytest.approx(20.0)


def test_a_worker_gone_from_the_last_scrape_is_left_out() -> None:
    before = {"decode": Worker(), "decode_1": Worker(ttft=(5, 0.5))}
    after = {"decode": Worker()}
    w = window_between([scrape_at(0.0, before), scrape_at(1.0, after)])
    assert [x.worker for x in w.pool("decode").workers] == ["decode"]
