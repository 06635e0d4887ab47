"""What the core remembers between decisions, and what one decision says.

`PlannerState` is immutable: `policy.plan` takes the previous one and returns the next inside
its `Decision`, so a replay of the same windows gives the same decisions.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

Point = tuple[float, float]  # (load, latency seconds)


@dataclass(frozen=True, slots=True)
class PoolProposal:
    """What a mode wants for one pool before bounds, budget, cool-down and hysteresis."""

    target: int
    reason: str
    ttft_s: float | None = None  # predicted at `target`
    itl_s: float | None = None


@dataclass(frozen=True, slots=True)
class PlannerState:
    last_change: Mapping[str, float] = field(default_factory=dict)  # pool -> time of its last change
    down_streak: Mapping[str, int] = field(default_factory=dict)  # pool -> windows in a row wanting fewer
    points: Mapping[str, tuple[Point, ...]] = field(default_factory=dict)  # "<pool>.<signal>" -> samples
    history: tuple[tuple[float, float, float, float], ...] = ()  # (rate, isl, osl, hit) per window
    corrections: Mapping[str, float] = field(default_factory=dict)  # "ttft"/"itl" -> observed/expected


@dataclass(frozen=True, slots=True)
class Decision:
    """Targets per pool, why, what latency the mode expects at those targets, the next state."""

    targets: Mapping[str, int]
    reasons: Mapping[str, str]
    predicted_ttft_s: float | None
    predicted_itl_s: float | None
    state: PlannerState

    def changes(self, replicas: Mapping[str, int]) -> dict[str, int]:
        """Pools whose target differs from their current count."""
        return {p: n for p, n in self.targets.items() if n != replicas.get(p, 0)}
