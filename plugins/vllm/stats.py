"""Load and cache counters of a vLLM engine, from vLLM's own stat-logger interface.

vLLM calls `record(scheduler_stats, ...)` on its engine thread (our loop thread) after every
step; `snapshot()` is read from any thread (the worker's poller and event publisher). Only
whole-object assignments cross threads, so no lock is needed.
"""

from __future__ import annotations

from vllm.v1.metrics.loggers import StatLoggerBase

from trident.core.types import EngineStats


class SchedulerStatsLogger(StatLoggerBase):
    """One per engine; passed to vLLM as a stat-logger factory (`__call__`)."""

    def __init__(self) -> None:  # noqa: D107 - vLLM's base takes (config, index): see __call__
        self.total_blocks = 0
        self.generated_tokens = 0  # counted by the engine loop
        self.active_prefill_tokens = 0  # set by the engine loop: prompts not yet prefilled
        self._prompt_tokens = 0
        self._cached_tokens = 0
        self._preemptions = 0
        self._latest = EngineStats(0, 0, 0, 0, 0, 0, 0, 0, 0, 0)

    def __call__(self, vllm_config, engine_index: int = 0) -> SchedulerStatsLogger:
        return self  # vLLM builds its loggers from factories; this one is already built

    def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0) -> None:
        if scheduler_stats is None:
            return
        cache = scheduler_stats.prefix_cache_stats
        if cache is not None:
            self._prompt_tokens += cache.queries
            self._cached_tokens += cache.hits
            self._preemptions += cache.preempted_requests
        active = round(scheduler_stats.kv_cache_usage * self.total_blocks)
        self._latest = EngineStats(
            running=scheduler_stats.num_running_reqs,
            waiting=scheduler_stats.num_waiting_reqs + scheduler_stats.num_skipped_waiting_reqs,
            active_blocks=active,
            total_blocks=self.total_blocks,
            cached_blocks=0,  # vLLM reports usage, not its count of cached free blocks
            active_prefill_tokens=self.active_prefill_tokens,
            prompt_tokens=self._prompt_tokens,
            cached_prompt_tokens=self._cached_tokens,
            generated_tokens=self.generated_tokens,
            preemptions=self._preemptions,
        )

    def idle(self) -> None:
        """Nothing is running or waiting (vLLM reports usage only after a step: after the last
        request finished or was aborted, its last report still counts it)."""
        self.active_prefill_tokens = 0
        latest = self._latest
        if latest.running or latest.waiting or latest.active_blocks or latest.active_prefill_tokens:
            fields = {f: getattr(latest, f) for f in EngineStats.__slots__}
            fields.update(running=0, waiting=0, active_blocks=0, active_prefill_tokens=0)
            self._latest = EngineStats(**fields)

    def snapshot(self) -> EngineStats:
        latest = self._latest
        if (latest.generated_tokens, latest.active_prefill_tokens) == (self.generated_tokens, self.active_prefill_tokens):
            return latest
        fields = {f: getattr(latest, f) for f in EngineStats.__slots__}
        fields.update(generated_tokens=self.generated_tokens, active_prefill_tokens=self.active_prefill_tokens)
        return EngineStats(**fields)

    def log_engine_initialized(self) -> None:
        pass

    def log(self) -> None:
        pass
