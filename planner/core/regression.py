"""Latency as a straight line of load, fitted on recent windows (the load mode's model)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

MIN_POINTS = 4
MIN_SPREAD = 0.25  # relative spread of load the points must cover before the slope is trusted


@dataclass(frozen=True, slots=True)
class Line:
    intercept: float
    slope: float

    def at(self, x: float) -> float:
        return self.intercept + self.slope * x


def fit(points: Sequence[tuple[float, float]]) -> Line | None:
    """Least squares `latency = a + b * load` with b >= 0; None when the points cannot tell
    (too few, or all at about the same load)."""
    if len(points) < MIN_POINTS:
        return None
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    if max(xs) - min(xs) < MIN_SPREAD * max(abs(mx), 1e-9) or sxx <= 0:
        return None
    slope = max(sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx, 0.0)
    return Line(my - slope * mx, slope)
