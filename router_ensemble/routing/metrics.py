"""Routing metrics: decisions per worker, cache hit rate, decision time by phase.

Two hit rates: `predicted_hit_rate` is what the index promised at decision time (overlap
blocks / prompt blocks, the blocks in any tier of the chosen worker); `served_hit_rate` is what
the engines reported back (cached prompt tokens / prompt tokens, fed by `record_served`). A gap
between them means a stale index. `weighted_overlap_blocks` counts the same overlap with each
block weighed by the best tier holding it (as the cost does): below `overlap_blocks` by what
the routed hits sat in host memory or on disk.
"""

from __future__ import annotations

import threading
from collections import Counter, deque
from typing import Any

from trident.core.stats import percentile

PHASES = ("hashing", "lookup", "schedule", "total")


class RoutingMetrics:
    """Thread-safe counters. `KvRouter.decide` records on request threads; exporters
    (the router model's metrics, benchmarks, tests) read `snapshot()`."""

    def __init__(self, window: int = 4096) -> None:
        self._lock = threading.Lock()
        self.decisions: Counter[str] = Counter()
        self.prompt_blocks = 0
        self.overlap_blocks = 0
        self.weighted_overlap_blocks = 0.0
        self.served_prompt_tokens = 0
        self.served_cached_tokens = 0
        self._timings: dict[str, deque[float]] = {p: deque(maxlen=window) for p in PHASES}

    def record_decision(
        self,
        worker_id: str,
        prompt_blocks: int,
        overlap_blocks: int,
        hashing_us: float,
        lookup_us: float,
        schedule_us: float,
        weighted_overlap: float | None = None,
    ) -> None:
        with self._lock:
            self.decisions[worker_id] += 1
            self.prompt_blocks += prompt_blocks
            self.overlap_blocks += overlap_blocks
            self.weighted_overlap_blocks += (
                overlap_blocks if weighted_overlap is None else weighted_overlap
            )
            timings = self._timings
            timings["hashing"].append(hashing_us)
            timings["lookup"].append(lookup_us)
            timings["schedule"].append(schedule_us)
            timings["total"].append(hashing_us + lookup_us + schedule_us)

    def record_served(self, worker_id: str, prompt_tokens: int, cached_tokens: int) -> None:
        """What the engine reported for a finished request (its real prefix-cache hit)."""
        with self._lock:
            self.served_prompt_tokens += prompt_tokens
            self.served_cached_tokens += cached_tokens

    @property
    def predicted_hit_rate(self) -> float:
        with self._lock:
            return self.overlap_blocks / self.prompt_blocks if self.prompt_blocks else 0.0

    @property
    def served_hit_rate(self) -> float:
        with self._lock:
            if not self.served_prompt_tokens:
                return 0.0
            return self.served_cached_tokens / self.served_prompt_tokens

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            timings = {p: sorted(v) for p, v in self._timings.items()}
            out: dict[str, Any] = {
                "decisions": dict(self.decisions),
                "prompt_blocks": self.prompt_blocks,
                "overlap_blocks": self.overlap_blocks,
                "weighted_overlap_blocks": self.weighted_overlap_blocks,
                "served_prompt_tokens": self.served_prompt_tokens,
                "served_cached_tokens": self.served_cached_tokens,
            }
        out["predicted_hit_rate"] = (
            out["overlap_blocks"] / out["prompt_blocks"] if out["prompt_blocks"] else 0.0
        )
        served = out["served_prompt_tokens"]
        out["served_hit_rate"] = out["served_cached_tokens"] / served if served else 0.0
        out["decision_us"] = {
            p: {
                "p50": percentile(v, 50) if v else 0.0,
                "p99": percentile(v, 99) if v else 0.0,
                "mean": sum(v) / len(v) if v else 0.0,
            }
            for p, v in timings.items()
        }
        return out
