"""Routing metrics on Triton's `/metrics`, through `pb_utils.MetricFamily`.

Families (every metric labelled `router` = the router model's name, and `pool` = the worker
pool it routes, `decode` or `prefill`):

- `trident_router_decisions_total{worker, policy}`: requests routed to each worker;
- `trident_router_decision_seconds{phase}`: histogram of the time one decision took, per
  phase: `hashing` (prompt -> block hashes), `lookup` (index), `schedule` (policy) and `total`;
- `trident_router_prompt_blocks_total`, `trident_router_overlap_blocks_total`: the index's
  view (full prompt blocks, and those the chosen worker held in any tier);
  `trident_router_weighted_overlap_blocks_total`: those blocks weighed by the best tier holding
  each (device 1, host and disk less; see `routing.policies`);
- `trident_router_prompt_tokens_total`, `trident_router_cached_tokens_total`: what the engines
  reported for finished requests (prompt tokens, and those served from the prefix cache);
- `trident_router_cache_hit_ratio{kind}`: `predicted` (overlap / prompt blocks) and `served`
  (cached / prompt tokens) since the router started;
- `trident_router_live_workers`: workers the router currently routes to;
- `trident_router_migrations_total{cause}` (no `pool` label): requests moved to another
  worker after theirs was lost (`orchestration.migration` names the causes).

Request threads append decisions to a deque (`observe`); `flush()` runs on a request thread
once its final response is out (`RouterModel`, one flush at a time) and turns
counters of `RoutingMetrics` into increments. Each metric update is an IPC call to the server,
so none is made while a decision is being taken.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable, Mapping
from typing import Any

from router_ensemble.routing.router import Decision, KvRouter

logger = logging.getLogger(__name__)

DECISION_BUCKETS = [1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 5e-2]
PHASES = ("hashing", "lookup", "schedule", "total")
_COUNTERS = {  # family -> (RoutingMetrics snapshot key, description)
    "trident_router_prompt_blocks_total": ("prompt_blocks", "Full prompt blocks of routed requests"),
    "trident_router_overlap_blocks_total": ("overlap_blocks", "Prompt blocks the chosen worker held, per the index"),
    "trident_router_weighted_overlap_blocks_total": (
        "weighted_overlap_blocks",
        "Prompt blocks the chosen worker held, each weighed by its best tier",
    ),
    "trident_router_prompt_tokens_total": ("served_prompt_tokens", "Prompt tokens of finished requests"),
    "trident_router_cached_tokens_total": ("served_cached_tokens", "Prompt tokens served from a worker's prefix cache"),
}


class RoutingMetricsExporter:
    """Metric families of one router model instance, for each pool it routes. Created in
    `initialize` (inside a stub, `pb` = its `triton_python_backend_utils`)."""

    def __init__(
        self, pb: Any, router_name: str, pools: Mapping[str, KvRouter],
        migrations: Callable[[], Mapping[str, int]] = dict,
    ) -> None:
        self.pools = dict(pools)
        self.migrations = migrations  # Migration.counts: cause -> requests moved
        self._labels = {"router": router_name}
        self._pending: collections.deque[tuple[str, Decision]] = collections.deque()
        self._families: dict[str, Any] = {}
        self._metrics: dict[tuple[str, tuple[tuple[str, str], ...]], Any] = {}
        self._seen: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}  # last exported values
        kinds = {
            "trident_router_decisions_total": ("COUNTER", "Requests routed to each worker"),
            "trident_router_decision_seconds": ("HISTOGRAM", "Time of one routing decision, by phase"),
            "trident_router_cache_hit_ratio": ("GAUGE", "Prefix-cache hit rate since start (predicted, served)"),
            "trident_router_live_workers": ("GAUGE", "Workers the router currently routes to"),
            "trident_router_migrations_total": ("COUNTER", "Requests moved to another worker after theirs was lost"),
            **{name: ("COUNTER", description) for name, (_, description) in _COUNTERS.items()},
        }
        for name, (kind, description) in kinds.items():
            self._families[name] = pb.MetricFamily(name=name, description=description, kind=getattr(pb.MetricFamily, kind))

    def observer(self, pool: str) -> Callable[[Decision], None]:
        """The `on_decision` hook of one pool's selector: remember each decision (append only)."""
        return lambda decision: self._pending.append((pool, decision))

    def flush(self) -> None:
        """Request thread (one at a time): push what happened since the last flush."""
        try:
            while self._pending:
                pool, d = self._pending.popleft()
                values = (d.hashing_us, d.lookup_us, d.schedule_us, d.total_us)
                for phase, us in zip(PHASES, values, strict=True):
                    self._metric("trident_router_decision_seconds", pool=pool, phase=phase).observe(us / 1e6)
            for pool, router in self.pools.items():
                self._flush_pool(pool, router)
            for cause, count in self.migrations().items():
                self._increment("trident_router_migrations_total", float(count), cause=cause)
        except Exception as exc:  # metrics must never take routing down
            logger.warning("routing metrics flush failed: %s", exc)

    def _flush_pool(self, pool: str, router: KvRouter) -> None:
        snap = router.metrics.snapshot()
        policy = router.config.policy
        for worker, count in snap["decisions"].items():
            self._increment("trident_router_decisions_total", float(count), pool=pool, worker=worker, policy=policy)
        for name, (key, _) in _COUNTERS.items():
            self._increment(name, float(snap[key]), pool=pool)
        self._set("trident_router_cache_hit_ratio", snap["predicted_hit_rate"], pool=pool, kind="predicted")
        self._set("trident_router_cache_hit_ratio", snap["served_hit_rate"], pool=pool, kind="served")
        self._set("trident_router_live_workers", float(len(router.workers())), pool=pool)

    def _increment(self, name: str, total: float, **labels: str) -> None:
        key = _key(name, labels)
        delta = total - self._seen.get(key, 0.0)
        if delta > 0:
            self._metric(name, **labels).increment(delta)
            self._seen[key] = total

    def _set(self, name: str, value: float, **labels: str) -> None:
        """Gauges: one IPC call only when the value changed (flushes run once per request)."""
        key = _key(name, labels)
        if self._seen.get(key) != value:
            self._metric(name, **labels).set(value)
            self._seen[key] = value

    def _metric(self, name: str, **labels: str) -> Any:
        key = _key(name, labels)
        metric = self._metrics.get(key)
        if metric is None:
            family = self._families[name]
            all_labels = {**self._labels, **labels}
            if name == "trident_router_decision_seconds":
                metric = family.Metric(labels=all_labels, buckets=DECISION_BUCKETS)
            else:
                metric = family.Metric(labels=all_labels)
            self._metrics[key] = metric
        return metric

    def close(self) -> None:
        """Drop metrics before their families (Triton requires that order)."""
        self._metrics.clear()
        self._families.clear()


def _key(name: str, labels: dict[str, str]) -> tuple[str, tuple[tuple[str, str], ...]]:
    return name, tuple(sorted(labels.items()))
