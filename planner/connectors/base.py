"""The connector port: what the planner loop needs from whatever runs the workers.

`PlannerLoop` (planner.loop) calls `replicas()` before each decision and `scale(pool,
target)` on its action thread, one call at a time per connector; `scale` blocks until the
pool has `target` serving replicas (a removal returns once the replica is drained and gone)
or raises `TridentError`. `close()` is called once when the planner stops and must be safe
to call twice.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol


class Connector(Protocol):
    name: str
    model_names: bool  # whether replicas() are Triton model names (the `worker` label of /metrics)

    def replicas(self) -> Mapping[str, tuple[str, ...]]:
        """Serving replicas per pool (`decode`, `prefill`): ready and not draining."""
        ...

    def scale(self, pool: str, target: int) -> None:
        """Make `pool` have `target` serving replicas (add, or drain then remove)."""
        ...

    def close(self) -> None: ...
