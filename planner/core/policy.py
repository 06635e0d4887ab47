"""The core's entry point: `plan(window, replicas, config, profile, state, now) -> Decision`.

Called by `planner.loop.PlannerLoop` once per window, and by tests and offline replays with
table inputs. It asks the configured mode (`load_mode` or `sla_mode`) what each pool needs,
then applies, in order:

1. bounds per pool (`min_*`/`max_*`);
2. hysteresis: a pool shrinks only after `down_windows` windows in a row want it smaller, and
   by one worker at a time; it grows at once, as far as the mode asks;
3. cool-down: no growing a pool within `up_cooldown_s` of its last change (a new worker
   must first take load before its effect shows), no shrinking within `down_cooldown_s`;
4. the worker budget: the sum of workers x `worker_cost` never exceeds it; growth that does
   not fit is trimmed, the pool asking for the smaller growth giving way first.

`now` is the caller's clock (the end of the window); nothing here reads one.
"""

from __future__ import annotations

from collections.abc import Mapping

from planner.config import PlannerConfig
from planner.core import load_mode, sla_mode
from planner.core.observation import Window
from planner.core.profile import Profile
from planner.core.signals import signals
from planner.core.state import Decision, PlannerState, PoolProposal


def plan(
    window: Window,
    replicas: Mapping[str, int],
    config: PlannerConfig,
    profile: Profile | None,
    state: PlannerState,
    now: float,
    budget: float,
) -> Decision:
    """One decision; see the module docstring. `replicas`: serving workers per pool."""
    proposals, state = _propose(window, replicas, config, profile, state)
    targets: dict[str, int] = {}
    reasons: dict[str, str] = {}
    last_change = dict(state.last_change)
    streak = dict(state.down_streak)
    for pool in config.pools:
        current = replicas.get(pool, 0)
        proposal = proposals[pool]
        lo, hi = config.bounds(pool)
        want = min(max(proposal.target, lo), hi)
        reason = proposal.reason if want == proposal.target else f"{proposal.reason} (bounded to [{lo}, {hi}])"
        since = now - last_change.get(pool, float("-inf"))
        if want < current and current > lo:
            streak[pool] = streak.get(pool, 0) + 1
            if streak[pool] < config.down_windows:
                want, reason = current, f"{reason}; waiting ({streak[pool]}/{config.down_windows} windows)"
            elif since < config.down_cooldown_s:
                want, reason = current, f"{reason}; cooling down ({since:.0f}/{config.down_cooldown_s:.0f} s)"
            else:
                want = current - 1 if current - 1 >= lo else lo
        else:
            streak[pool] = 0
            if current < want and current >= lo and since < config.up_cooldown_s:
                want, reason = current, f"{reason}; cooling down ({since:.0f}/{config.up_cooldown_s:.0f} s)"
        targets[pool], reasons[pool] = want, reason
    targets, reasons = _fit_budget(targets, reasons, replicas, config, budget)
    for pool, n in targets.items():
        if n != replicas.get(pool, 0):
            last_change[pool] = now
            streak[pool] = 0
    predicted_ttft = next((p.ttft_s for p in proposals.values() if p.ttft_s is not None), None)
    predicted_itl = next((p.itl_s for p in proposals.values() if p.itl_s is not None), None)
    return Decision(
        targets, reasons, predicted_ttft, predicted_itl,
        PlannerState(last_change, streak, state.points, state.history, state.corrections),
    )


def _propose(
    window: Window, replicas: Mapping[str, int], config: PlannerConfig, profile: Profile | None, state: PlannerState
) -> tuple[dict[str, PoolProposal], PlannerState]:
    """The mode's proposals, and the state with this window's samples added."""
    points = dict(state.points)
    for pool in config.pools:
        for signal in signals(pool, config):
            key = f"{pool}.{signal}"
            fresh = load_mode.new_points(window.pool(pool), signal)
            points[key] = (points.get(key, ()) + tuple(fresh))[-load_mode.MAX_POINTS:]
    history = (state.history + ((window.request_rate, window.input_tokens, window.output_tokens,
                                 window.prefix_hit_rate),))[-config.forecast_windows:]
    corrections = dict(state.corrections)
    if config.mode == "sla":
        assert profile is not None, "PlannerConfig.validate requires a profile for mode sla"
        corrections = sla_mode.corrections(window, replicas, profile, config, corrections)
        demand = sla_mode.forecast(history, config.forecast)
        proposals = sla_mode.propose_all(config, profile, demand, corrections)
    else:
        proposals = {
            pool: load_mode.propose(pool, window.pool(pool), replicas.get(pool, 0), config, points)
            for pool in config.pools
        }
    return proposals, PlannerState(state.last_change, state.down_streak, points, history, corrections)


def _fit_budget(
    targets: dict[str, int],
    reasons: dict[str, str],
    replicas: Mapping[str, int],
    config: PlannerConfig,
    budget: float,
) -> tuple[dict[str, int], dict[str, str]]:
    """Trim growth until the workers fit the budget (shrinking is never trimmed)."""
    cost = config.worker_cost
    order = sorted(targets, key=lambda p: targets[p] - replicas.get(p, 0))  # the smallest growth gives way first
    for pool in order:
        while sum(targets.values()) * cost > budget + 1e-9 and targets[pool] > replicas.get(pool, 0):
            targets[pool] -= 1
            reasons[pool] = f"{reasons[pool]}; limited by the worker budget ({budget:g})"
    return targets, reasons
