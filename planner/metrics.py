"""Reading Triton's `/metrics` into the core's `Window`.

`scrape(url)` fetches and parses the Prometheus text (`prometheus_client`'s parser) into a
`Scrape`: sample values keyed by name and labels. `window_between(scrapes)` turns the scrapes
of one window (the first at its start, the last at its end) into a `planner.core.Window`:

- per worker (label `worker`; its pool from the replica name): TTFT and ITL means from the
  histograms' `_sum`/`_count` differences; running, waiting, active prefill tokens and KV
  usage averaged over the scrapes;
- arrivals from the router's `trident_router_decisions_total{pool="decode"}` (else the
  decode workers' first tokens); input length from the decode workers' prompt tokens per
  first token, output length from generated tokens per finished request; prefix hit rate
  from the router's served cached / prompt tokens.

A counter that went down (its worker was reloaded) counts from zero. Called by
`planner.loop` (its scraper) and by the Triton connector's drain (`inflight`).
"""

from __future__ import annotations

import urllib.request
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from planner.core.observation import PoolWindow, Window, WorkerLoad
from trident.core.errors import TridentError
from trident.core.names import parse_replica

Key = tuple[str, tuple[tuple[str, str], ...]]


@dataclass(frozen=True, slots=True)
class Scrape:
    t: float  # the caller's clock, seconds
    samples: Mapping[Key, float]

    def value(self, name: str, **labels: str) -> float:
        """Sum of the samples of `name` whose labels include `labels`."""
        want = set(labels.items())
        return sum(v for (n, ls), v in self.samples.items() if n == name and want <= set(ls))

    def workers(self) -> set[str]:
        return {dict(ls)["worker"] for (n, ls) in self.samples if n == "trident_requests_running" and "worker" in dict(ls)}


def parse(text: str, t: float) -> Scrape:
    samples: dict[Key, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
    return Scrape(t, samples)


def scrape(url: str, t: float, timeout_s: float = 5.0) -> Scrape:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            return parse(resp.read().decode("utf-8", "replace"), t)
    except (OSError, ValueError) as exc:
        raise TridentError(f"cannot read metrics from {url}: {exc}") from exc


def inflight(s: Scrape, worker: str) -> float | None:
    """Requests the worker still holds, plus KV blocks leased for a pull (0 = drained);
    None when the worker publishes no such gauge (yet), which must not read as drained."""
    if not any(n == "trident_requests_inflight" and ("worker", worker) in ls for (n, ls) in s.samples):
        return None
    return s.value("trident_requests_inflight", worker=worker) + s.value("trident_kv_blocks_held", worker=worker)


def window_between(scrapes: Sequence[Scrape], serving: Mapping[str, Collection[str]] | None = None) -> Window:
    """The window from the first to the last scrape; `serving` (pool -> workers) keeps
    only those workers (draining and loading ones are left out)."""
    if len(scrapes) < 2:
        raise ValueError("a window needs at least two scrapes")
    first, last = scrapes[0], scrapes[-1]
    dt = max(last.t - first.t, 1e-9)
    pools: dict[str, list[WorkerLoad]] = {}
    for worker in sorted(last.workers()):
        parsed = parse_replica(worker)
        if parsed is None or (serving is not None and worker not in serving.get(parsed[0], ())):
            continue
        pools.setdefault(parsed[0], []).append(_worker_load(worker, scrapes))
    decode = pools.get("decode", [])
    firsts = sum(w.first_tokens for w in decode)
    d = _delta_fn(first, last)
    arrivals = d("trident_router_decisions_total", pool="decode") or firsts
    prompt = sum(d("trident_prompt_tokens_total", worker=w.worker) for w in decode)
    finished = sum(d("trident_requests_total", worker=w.worker) for w in decode)
    generated = sum(d("trident_generation_tokens_total", worker=w.worker) for w in decode)
    served = d("trident_router_prompt_tokens_total")
    return Window(
        duration_s=dt,
        request_rate=arrivals / dt,
        input_tokens=prompt / firsts if firsts else 0.0,
        output_tokens=generated / finished if finished else 0.0,
        prefix_hit_rate=d("trident_router_cached_tokens_total") / served if served else 0.0,
        pools={pool: PoolWindow(tuple(ws)) for pool, ws in pools.items()},
    )


def _delta_fn(first: Scrape, last: Scrape):  # noqa: ANN202 - a small closure
    def delta(name: str, **labels: str) -> float:
        a, b = first.value(name, **labels), last.value(name, **labels)
        return b - a if b >= a else b  # reset: the counter restarted with its worker

    return delta


def _worker_load(worker: str, scrapes: Sequence[Scrape]) -> WorkerLoad:
    d = _delta_fn(scrapes[0], scrapes[-1])
    ttft_n = d("trident_time_to_first_token_seconds_count", worker=worker)
    itl_n = d("trident_inter_token_latency_seconds_count", worker=worker)
    ttft = d("trident_time_to_first_token_seconds_sum", worker=worker) / ttft_n if ttft_n else None
    itl = d("trident_inter_token_latency_seconds_sum", worker=worker) / itl_n if itl_n else None

    def mean(name: str) -> float:
        return sum(s.value(name, worker=worker) for s in scrapes[1:]) / (len(scrapes) - 1)

    total = mean("trident_kv_blocks_capacity")
    return WorkerLoad(
        worker=worker,
        running=mean("trident_requests_running"),
        waiting=mean("trident_requests_waiting"),
        active_prefill_tokens=mean("trident_prefill_tokens_active"),
        kv_usage=mean("trident_kv_blocks_used") / total if total else 0.0,
        ttft_s=ttft,
        itl_s=itl,
        first_tokens=int(ttft_n),
        tokens=int(itl_n),
    )
