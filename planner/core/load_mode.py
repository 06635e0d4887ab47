"""Reactive sizing from live latency and load (`--mode load`), after Dynamo's load planner.

For each pool and each latency it answers for (`signals`), every worker's window mean is
compared with the target (times the headroom):

- grow by one when every worker is over target (a worker with no observation counts as over
  only when requests wait on it): the pool as a whole is overloaded, not one unlucky worker;
- shrink by one when every worker is under `down_margin` of the target and the load the
  remaining workers would carry, load x N/(N-1), is predicted to stay under target. The
  prediction is a least-squares line of latency against active requests per worker, fitted
  on the pool's recent windows (`regression`); until the points span enough load, latency
  is assumed proportional to load (latency x N/(N-1)), which overestimates the cost of a
  removal for ITL (it has a fixed part). Either is raised to the median latency the pool's
  workers showed in recent windows at that load per worker or more, so a pool that was
  overloaded with N-1 workers a moment ago does not shrink back into it;
- otherwise hold.

Pure: the caller passes the window, the current count and the remembered points.
"""

from __future__ import annotations

from planner.config import PlannerConfig
from planner.core.observation import PoolWindow, WorkerLoad
from planner.core.regression import fit
from planner.core.signals import ITL, TTFT, signals, target_s
from planner.core.state import Point, PoolProposal

MAX_POINTS = 120  # samples kept per pool and signal


def observed(worker: WorkerLoad, signal: str) -> float | None:
    return worker.ttft_s if signal == TTFT else worker.itl_s


def new_points(window: PoolWindow, signal: str) -> list[Point]:
    return [(w.active, y) for w in window.workers if (y := observed(w, signal)) is not None]


def propose(
    pool: str,
    window: PoolWindow,
    current: int,
    config: PlannerConfig,
    points: dict[str, tuple[Point, ...]],
) -> PoolProposal:
    """One pool's proposal; `points` ("<pool>.<signal>" -> samples, already holding this
    window's) are read only."""
    if current == 0 or not window.workers:
        lo, _ = config.bounds(pool)
        return PoolProposal(max(current, lo), "no worker observed" if current else "pool empty")
    over, under, predicted = [], [], {}
    for signal in signals(pool, config):
        target = target_s(signal, config)
        values = [observed(w, signal) for w in window.workers]
        over.append(all(_over(w, v, target) for w, v in zip(window.workers, values, strict=True)))
        under.append(all(v is None or v < config.down_margin * target for v in values))
        predicted[signal] = _after_removal(window, signal, current, points.get(f"{pool}.{signal}", ()))
    ttft, itl = predicted.get(TTFT), predicted.get(ITL)
    if any(over):
        names = [s for s, o in zip(signals(pool, config), over, strict=True) if o]
        return PoolProposal(current + 1, f"every worker over the {'/'.join(names)} target", *_now(window))
    if current > 1 and all(under):
        blocked = [s for s, y in predicted.items() if y is not None and y > target_s(s, config)]
        if blocked:
            return PoolProposal(
                current, f"would shrink, but {current - 1} workers would miss the {'/'.join(blocked)} target", ttft, itl
            )
        return PoolProposal(current - 1, "every worker well under target, and N-1 would hold the load", ttft, itl)
    return PoolProposal(current, "within target", *_now(window))


def _over(worker: WorkerLoad, value: float | None, target: float) -> bool:
    return worker.waiting >= 1.0 if value is None else value > target


def _now(window: PoolWindow) -> tuple[float | None, float | None]:
    return window.ttft_s, window.itl_s


def _after_removal(window: PoolWindow, signal: str, n: int, points: tuple[Point, ...]) -> float | None:
    """Predicted latency when the pool's load is spread over one worker fewer."""
    if n <= 1:
        return None
    now = [observed(w, signal) for w in window.workers]
    seen = [v for v in now if v is not None]
    if not seen:
        return None
    scale = n / (n - 1)
    load = window.mean("active") * scale
    line = fit(points)
    estimate = max(line.at(load), max(seen)) if line is not None else max(seen) * scale
    # What workers showed when they last carried that much load each: queueing makes
    # latency rise faster than any line near saturation, and the pool may have been there
    # with one worker fewer minutes ago.
    nearby = sorted(y for x, y in points if x >= 0.8 * load)
    if len(nearby) >= 2:
        estimate = max(estimate, nearby[len(nearby) // 2])
    return estimate
