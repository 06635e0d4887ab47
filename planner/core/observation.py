"""What the planner sees of the service over one window (a few scrapes of `/metrics`).

`planner.metrics.window_between` builds a `Window` from two scrapes (counters and histograms
as differences, gauges averaged over the scrapes in between); tests build them directly.
Latencies are means over the window, in seconds; `None` when nothing was observed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class WorkerLoad:
    """One worker over the window."""

    worker: str
    running: float = 0.0  # requests being decoded (mean of the scrapes)
    waiting: float = 0.0  # requests queued in the engine
    active_prefill_tokens: float = 0.0  # prompt tokens admitted but not yet prefilled
    kv_usage: float = 0.0  # used / total KV blocks, 0..1
    ttft_s: float | None = None  # mean time to first token of requests started in the window
    itl_s: float | None = None  # mean inter-token latency
    first_tokens: int = 0  # how many TTFT observations the mean is over
    tokens: int = 0  # how many ITL observations

    @property
    def active(self) -> float:
        """Requests on the worker (running + waiting)."""
        return self.running + self.waiting


@dataclass(frozen=True, slots=True)
class PoolWindow:
    """The workers of one pool (`decode` or `prefill`) over the window."""

    workers: tuple[WorkerLoad, ...] = ()

    @property
    def ttft_s(self) -> float | None:
        return _weighted((w.ttft_s, w.first_tokens) for w in self.workers)

    @property
    def itl_s(self) -> float | None:
        return _weighted((w.itl_s, w.tokens) for w in self.workers)

    def mean(self, attr: str) -> float:
        return sum(getattr(w, attr) for w in self.workers) / len(self.workers) if self.workers else 0.0


@dataclass(frozen=True, slots=True)
class Window:
    """The service over `duration_s` seconds.

    `request_rate` counts arrivals (the router's decisions for the decode pool); the lengths
    are means of the requests that finished in the window; `prefix_hit_rate` is the share of
    prompt tokens served from a prefix cache (the router's served counters).
    """

    duration_s: float
    request_rate: float = 0.0
    input_tokens: float = 0.0
    output_tokens: float = 0.0
    prefix_hit_rate: float = 0.0
    pools: Mapping[str, PoolWindow] = field(default_factory=dict)

    def pool(self, name: str) -> PoolWindow:
        return self.pools.get(name, PoolWindow())


def _weighted(pairs: object) -> float | None:
    total = weight = 0.0
    for value, n in pairs:  # type: ignore[attr-defined]
        if value is not None and n > 0:
            total += value * n
            weight += n
    return total / weight if weight else None
