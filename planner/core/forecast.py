"""Predictors of the next window's request rate and lengths (the SLA mode's demand).

`constant`: the last window. `trend`: a least-squares line through the last windows,
extrapolated one window ahead (never below zero), so a ramp is met as it climbs.
"""

from __future__ import annotations

from collections.abc import Sequence


def predict(values: Sequence[float], kind: str) -> float:
    if not values:
        return 0.0
    if kind == "constant" or len(values) < 2:
        return values[-1]
    n = len(values)
    mx = (n - 1) / 2
    my = sum(values) / n
    sxx = sum((i - mx) ** 2 for i in range(n))
    slope = sum((i - mx) * (v - my) for i, v in enumerate(values)) / sxx
    return max(my + slope * (n - mx), 0.0)
