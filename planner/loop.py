"""The planner process's loop: scrape, decide, act.

`PlannerLoop.run(stop)` runs on the main thread of `python -m planner`: every `scrape_s` it
reads `/metrics`; every `interval_s` it turns the window's scrapes into a `Window`, asks the
core for a `Decision` (`planner.core.policy.plan`) and, when a pool's target differs from
its serving replicas, hands the change to its action thread, which calls the connector
(`scale` blocks while a replica loads or drains). While an action runs, windows are still
observed (the core's samples grow) but no new change is started. `records` keeps one
`Record` per decision (the benchmark and the logs read it).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

from planner.config import PlannerConfig
from planner.connectors.base import Connector
from planner.core.observation import Window
from planner.core.policy import plan
from planner.core.profile import Profile
from planner.core.state import Decision, PlannerState
from planner.metrics import Scrape, window_between
from trident.core.errors import TridentError

logger = logging.getLogger(__name__)
MAX_RECORDS = 2000  # decisions kept for inspection (hours at the default interval)


@dataclass(frozen=True, slots=True)
class Record:
    t: float
    replicas: Mapping[str, int]
    window: Window
    decision: Decision
    acting: bool  # a change was already under way, so this decision was not acted on


class PlannerLoop:
    def __init__(
        self,
        config: PlannerConfig,
        connector: Connector,
        read_metrics: Callable[[float], Scrape],
        budget: float,
        profile: Profile | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.connector = connector
        self.read_metrics = read_metrics
        self.budget = budget
        self.profile = profile
        self.clock = clock
        self.state = PlannerState()
        self.records: collections.deque[Record] = collections.deque(maxlen=MAX_RECORDS)
        self._action: threading.Thread | None = None
        self._finished: dict[str, float] = {}  # pool -> when its last change completed

    def run(self, stop: threading.Event) -> None:
        """Until `stop` is set; then cuts a running action short (a drain stops waiting)
        and waits for it. A window whose scrapes or probes fail is skipped."""
        scrapes: list[Scrape] = []
        wait = 0.0  # the first scrape at once
        try:
            while not stop.wait(wait):
                wait = self.config.scrape_s
                try:
                    scrapes.append(self._scrape())
                    if scrapes[-1].t - scrapes[0].t >= self.config.interval_s - 1e-6:
                        self.step(scrapes)
                        scrapes = [scrapes[-1]]
                except TridentError as exc:
                    logger.warning("planner: %s", exc)
                    scrapes = scrapes[-1:]
        finally:
            self.connector.close()
            if self._action is not None:
                self._action.join()

    def step(self, scrapes: list[Scrape]) -> Record:
        """One decision from one window's scrapes; starts the action it calls for."""
        serving = self.connector.replicas()
        counts = {pool: len(serving.get(pool, ())) for pool in self.config.pools}
        window = window_between(scrapes, serving if self.connector.model_names else None)
        if self._finished:  # cool-downs count from when a change completed, not when it was asked
            done = {pool: self._finished.pop(pool) for pool in list(self._finished)}
            self.state = replace(self.state, last_change={**self.state.last_change, **done})
        decision = plan(window, counts, self.config, self.profile, self.state, scrapes[-1].t, self.budget)
        acting = self._action is not None and self._action.is_alive()
        changes = decision.changes(counts)
        if acting:
            decision = Decision(dict(counts), {p: "a change is under way" for p in counts},
                                decision.predicted_ttft_s, decision.predicted_itl_s, self.state_after_wait(decision))
        self.state = decision.state
        record = Record(scrapes[-1].t, counts, window, decision, acting)
        self.records.append(record)
        _log(record)
        if changes and not acting:
            self._action = threading.Thread(target=self._act, args=(changes,), name="planner-action", daemon=True)
            self._action.start()
        return record

    def state_after_wait(self, decision: Decision) -> PlannerState:
        """Keep the samples of a window in which nothing could change, but not its changes."""
        return replace(decision.state, last_change=self.state.last_change, down_streak=self.state.down_streak)

    def _scrape(self) -> Scrape:
        return self.read_metrics(self.clock())

    def _act(self, changes: dict[str, int]) -> None:
        for pool, target in changes.items():
            try:
                self.connector.scale(pool, target)
                self._finished[pool] = self.clock()
            except TridentError as exc:
                logger.error("planner: scaling %s to %d failed: %s", pool, target, exc)
            except Exception:
                logger.exception("planner: scaling %s to %d failed", pool, target)


def _log(record: Record) -> None:
    d = record.decision
    w = record.window
    parts = [f"{pool} {record.replicas.get(pool, 0)}->{n} ({d.reasons[pool]})" for pool, n in d.targets.items()]
    logger.info(
        "planner: %.2f req/s, isl %.0f, osl %.0f, hit %.0f%%, ttft %s, itl %s | %s",
        w.request_rate, w.input_tokens, w.output_tokens, 100 * w.prefix_hit_rate,
        _ms(w.pool("prefill").ttft_s if "prefill" in d.targets else w.pool("decode").ttft_s),
        _ms(w.pool("decode").itl_s), "; ".join(parts),
    )


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.0f} ms"
