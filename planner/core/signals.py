"""Which pool answers for which latency target.

Aggregated serving (no prefill pool): decode workers prefill too, so the decode pool answers
for both TTFT and ITL. Disaggregated: the prefill pool for TTFT, the decode pool for ITL.
"""

from __future__ import annotations

from planner.config import PlannerConfig

TTFT, ITL = "ttft", "itl"


def signals(pool: str, config: PlannerConfig) -> tuple[str, ...]:
    if pool == "prefill":
        return (TTFT,)
    return (ITL,) if "prefill" in config.pools else (TTFT, ITL)


def target_s(signal: str, config: PlannerConfig) -> float:
    """The latency the planner aims for: the target times the headroom, in seconds."""
    ms = config.ttft_target_ms if signal == TTFT else config.itl_target_ms
    return ms / 1000.0 * config.headroom
