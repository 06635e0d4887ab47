"""TensorRT-LLM iteration stats -> Trident's `EngineStats`.

`TrtllmEngine`'s loop thread drains `LLM.get_stats_async` (it needs
`enable_iter_perf_stats=True`) into one `StatsTracker` and counts tokens itself;
`snapshot()` is read from any thread (the worker's poller and event publisher): only
whole-object assignments cross threads. Pure: no tensorrt_llm import.

The dicts follow TensorRT-LLM's iteration stats JSON (`LLM.get_stats`; the trtllm-serve
`/metrics` example of TensorRT-LLM 1.1.0): `numActiveRequests`, `numQueuedRequests`,
`kvCacheStats` {`maxNumBlocks`, `freeNumBlocks`, `usedNumBlocks`, `tokensPerBlock`,
`allocTotalBlocks`, `allocNewBlocks`, `reusedBlocks`, `missedBlocks`, `cacheHitRate`},
`inflightBatchingStats` {`numContextRequests`, `numGenRequests`, `numCtxTokens`,
`numPausedRequests`, ...}. Missing keys count as 0.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from trident.core.types import EngineStats

_EMPTY = EngineStats(0, 0, 0, 0, 0, 0, 0, 0, 0, 0)


def _int(d: Mapping[str, Any] | None, key: str) -> int:
    if not isinstance(d, Mapping):
        return 0
    try:
        return int(d.get(key) or 0)
    except (TypeError, ValueError):
        return 0


class StatsTracker:
    """Counters of one engine; `record` on the loop thread, `snapshot` from any thread."""

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.total_blocks = 0
        self._prompt_tokens = 0
        self._cached_tokens = 0
        self._generated = 0
        self._iteration: Mapping[str, Any] = {}
        self._latest = _EMPTY

    def record(self, iterations: Iterable[Mapping[str, Any]]) -> None:
        """Iteration stats drained since the last call (the last one is the current state)."""
        for it in iterations:
            if isinstance(it, Mapping):
                self._iteration = it

    def finished(self, prompt_tokens: int, cached_tokens: int, generated: int) -> None:
        """A request ended (loop thread): its share of the cumulative counters."""
        self._prompt_tokens += prompt_tokens
        self._cached_tokens += cached_tokens
        self._generated += generated

    def publish(
        self, running: int, waiting: int, prefill_tokens: int, held_blocks: int = 0, leases: int = 0
    ) -> None:
        """Make a new snapshot from the last iteration and the engine's own request counts
        (TensorRT-LLM reports no iteration while idle, so its last one would stay stale)."""
        kv = self._iteration.get("kvCacheStats") if self._iteration else None
        total = _int(kv, "maxNumBlocks") or self.total_blocks
        used = _int(kv, "usedNumBlocks") if running or waiting else 0
        self._latest = EngineStats(
            running=running,
            waiting=waiting,
            active_blocks=min(used, total) if total else used,
            total_blocks=total,
            cached_blocks=0,  # TensorRT-LLM reports reuse counts, not its cached free blocks
            active_prefill_tokens=prefill_tokens,
            prompt_tokens=self._prompt_tokens,
            cached_prompt_tokens=self._cached_tokens,
            generated_tokens=self._generated,
            preemptions=0,  # reported per iteration as paused requests, not as preemption events
            held_blocks=held_blocks,
            leases=leases,
        )

    def snapshot(self) -> EngineStats:
        return self._latest
