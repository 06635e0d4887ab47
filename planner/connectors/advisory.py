"""A connector that only logs what the planner would do (`--connector advisory`).

It reports the replicas another connector would see (the Triton server's ready workers, or
a fixed view in tests) and turns each `scale` into a log line, so the planner's decisions
can be watched on a live service without it changing anything.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

logger = logging.getLogger(__name__)


class AdvisoryConnector:
    name = "advisory"
    model_names = True

    def __init__(self, view: Callable[[], Mapping[str, tuple[str, ...]]]) -> None:
        self.view = view
        self.advised: list[tuple[str, int]] = []  # (pool, target), oldest first

    def replicas(self) -> Mapping[str, tuple[str, ...]]:
        return self.view()

    def scale(self, pool: str, target: int) -> None:
        current = len(self.view().get(pool, ()))
        self.advised.append((pool, target))
        logger.info("planner (advisory): would scale %s from %d to %d workers", pool, current, target)

    def close(self) -> None:
        return None
