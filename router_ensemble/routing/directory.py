"""Which worker models exist, and the pluggable choice of one per request.

`WorkerDirectory` discovers the live replicas of a pool (`decode`, `decode_1`, ...) by
asking the server whether each is ready (`pb_utils.is_model_ready` inside the router model),
re-checking at most every `refresh_s`, so replicas that the launcher or the planner loads or
unloads at run time are picked up without restarting the router. A fixed list can be given
instead. Workers the planner marks draining (`trident.core.draining`: `draining()` returns
them) are left out of every selection at once (`selectable`), before they are unloaded, so they get
no new request; they stay in `workers()` (their streams and subscriptions go on) until unloaded.

Selectors implement the orchestration's `WorkerSelector` port over a directory:
`RoundRobinSelector` here (prompts and load ignored), `router.KvSelector` (KV-aware, the
router model's choice for both pools).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Collection, Sequence

from router_ensemble.orchestration.ports import Selection
from trident.core.errors import WorkerUnavailable
from trident.core.names import scan_replicas

logger = logging.getLogger(__name__)


class WorkerDirectory:
    """The ready replicas of one pool. Thread-safe; probes run on the calling request thread."""

    def __init__(
        self,
        pool: str,
        probe: Callable[[str], bool] | None = None,
        fixed: Sequence[str] = (),
        refresh_s: float = 2.0,
        max_gap: int = 4,
        clock: Callable[[], float] = time.monotonic,
        draining: Callable[[], Collection[str]] | None = None,
        remote: Callable[[], Sequence[str]] | None = None,
    ) -> None:
        if probe is None and not fixed and remote is None:
            raise ValueError("WorkerDirectory needs a probe or a fixed list of workers")
        self.pool = pool
        self.probe = probe
        self.fixed = tuple(fixed)
        self.refresh_s = refresh_s
        self.max_gap = max_gap
        self.clock = clock
        self.draining = draining
        self.remote = remote  # workers of this pool on other nodes (router_ensemble.triton.remote)
        self._workers: tuple[str, ...] = self.fixed
        self._checked = float("-inf")
        self._lock = threading.Lock()

    def selectable(self, ready: Collection[str]) -> list[str]:
        """Those of `ready` that may get a new request: not marked draining."""
        draining = self.draining() if self.draining is not None else ()
        return [w for w in ready if w not in draining] if draining else list(ready)

    def workers(self) -> tuple[str, ...]:
        """Ready workers, in name order (`decode`, `decode_1`, ...), then this pool's workers
        on other nodes (`<node>/<model>`); may be empty. Draining ones are included: they are
        still serving the requests they hold."""
        local = self._local()
        if self.remote is None:
            return local
        return local + tuple(w for w in self.remote() if w not in local)

    def _local(self) -> tuple[str, ...]:
        if self.fixed or self.probe is None:
            return self.fixed
        with self._lock:
            now = self.clock()
            if now - self._checked >= self.refresh_s:
                found = self._scan()
                if found != self._workers:
                    logger.info("pool %s: workers %s", self.pool, ", ".join(found) or "(none)")
                self._workers, self._checked = found, now
            return self._workers

    def refresh(self) -> None:
        """Re-scan now if the list is older than `refresh_s`. The router model calls it after
        each request's final response, so under load requests find the list fresh and do not
        wait for probes themselves."""
        if self.fixed or self.probe is None:
            return
        with self._lock:
            due = self.clock() - self._checked >= self.refresh_s
        if due:
            self._local()

    def is_gone(self, worker: str) -> bool:
        """After a failed call: re-scan now; True when `worker` is no longer ready."""
        self.invalidate()
        return worker not in self.workers()

    def invalidate(self) -> None:
        """Force a re-scan on the next call (e.g. after a worker failed)."""
        with self._lock:
            self._checked = float("-inf")

    def _scan(self) -> tuple[str, ...]:
        return scan_replicas(self.pool, self._ready, self.max_gap)

    def _ready(self, name: str) -> bool:
        try:
            return bool(self.probe(name))  # type: ignore[misc]
        except Exception as exc:  # an unknown model may raise instead of answering False
            logger.debug("probe %s: %s", name, exc)
            return False


class RoundRobinSelector:
    """A `WorkerSelector` (orchestration.ports) cycling through the directory's workers,
    ignoring prompts and load: the baseline, and the selector of in-process tests."""

    def __init__(self, directory: WorkerDirectory) -> None:
        self.directory = directory
        self._next = 0
        self._lock = threading.Lock()

    def select(self, request_id: str, token_ids: Sequence[int], exclude: Collection[str] = ()) -> Selection:
        workers = [w for w in self.directory.selectable(self.directory.workers()) if w not in exclude]
        if not workers:
            self.directory.invalidate()
            raise WorkerUnavailable(f"no {self.directory.pool} worker is ready" + (" and free" if exclude else ""))
        with self._lock:
            worker = workers[self._next % len(workers)]
            self._next += 1
        return Selection(worker)

    def release(self, request_id: str) -> None:
        return None

    def record_served(self, worker: str, prompt_tokens: int, cached_tokens: int) -> None:
        return None

    def is_gone(self, worker: str) -> bool:
        return self.directory.is_gone(worker)
