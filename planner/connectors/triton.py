"""The default connector: Triton's model-control API on one server.

Called by `planner.loop.PlannerLoop`'s action thread (`scale`) and before each decision
(`replicas`). It adds a replica as `trident serve` does (`trident.model_control.load_replica`:
the pool's template config renamed, plus its code as file overrides) and removes one without
dropping a request:

1. mark it draining (`trident.core.draining`): the router leaves it out of every new
   selection within `DrainMarkers.check_s`; wait `settle_s` so that a selection made just
   before the mark has reached the worker;
2. wait until the worker holds no request and leases no KV block (its
   `trident_requests_inflight` and `trident_kv_blocks_held` gauges, read twice in a row at
   0), at most `drain_timeout_s` (then it is unloaded anyway and the reason logged);
3. unload it, wait until the server no longer lists it ready (its stub exits, freeing its
   KV pool and shared memory), and remove the marker once the router has re-probed its
   pool (`forget_s`), so a stale list of ready workers cannot select the unloaded name.

The highest-numbered replica goes first, so names stay dense (`decode`, `decode_1`, ...).
A marker left by an interrupted planner is removed when its pool next grows (the worker is
serving again) or finished off when it next shrinks. The connector owns no worker: the
server does; it only holds the model-repository key it was given.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from planner.metrics import Scrape, inflight
from trident.core.draining import clear_draining, draining_workers, mark_draining
from trident.core.errors import TridentError
from trident.core.names import parse_replica, replica_name, scan_replicas
from trident.model_control import ModelControl, load_replica

logger = logging.getLogger(__name__)


class TritonConnector:
    name = "triton"
    model_names = True  # replicas() are the `worker` labels of /metrics

    def __init__(
        self,
        control: ModelControl,
        repository: Path,
        run_dir: Path,
        read_metrics: Callable[[], Scrape],
        pools: tuple[str, ...] = ("decode",),
        *,
        gpus: int = 0,
        root: str = "",
        drain_timeout_s: float = 300.0,
        load_timeout_s: float = 600.0,
        settle_s: float = 1.0,
        poll_s: float = 0.5,
        forget_s: float = 3.0,
    ) -> None:
        self.control = control
        self.repository = repository
        self.run_dir = run_dir
        self.read_metrics = read_metrics
        self.pools = pools
        self.gpus = gpus
        self.parameters = {"trident_root": root} if root else {}
        self.drain_timeout_s = drain_timeout_s
        self.load_timeout_s = load_timeout_s
        self.settle_s = settle_s
        self.poll_s = poll_s
        self.forget_s = forget_s  # > the router's WorkerDirectory.refresh_s (2 s)
        self._closed = threading.Event()

    # ---- the port ----------------------------------------------------------------------
    def replicas(self) -> Mapping[str, tuple[str, ...]]:
        draining = draining_workers(self.run_dir)
        ready = self._ready()
        return {pool: tuple(w for w in ready.get(pool, ()) if w not in draining) for pool in self.pools}

    def scale(self, pool: str, target: int) -> None:
        if pool not in self.pools:
            raise TridentError(f"pool {pool!r} is not one of {self.pools}")
        ready = list(self._ready().get(pool, ()))
        draining = draining_workers(self.run_dir)
        serving = [w for w in ready if w not in draining]
        stale = [w for w in ready if w in draining]
        while len(serving) < target and stale:  # a drain that never finished: serve again
            worker = stale.pop(0)
            clear_draining(self.run_dir, worker)
            serving.append(worker)
            logger.info("planner: %s serves again (its drain was interrupted)", worker)
        while len(serving) < target:
            serving.append(self._add(pool, set(ready) | set(serving)))
        for worker in stale:
            self._remove(worker)
        while len(serving) > target and not self._closed.is_set():
            self._remove(_sorted(serving).pop())
            serving = _sorted(serving)[:-1]

    def close(self) -> None:
        self._closed.set()

    # ---- steps -------------------------------------------------------------------------
    def _ready(self) -> dict[str, tuple[str, ...]]:
        """Ready replicas per pool, probed by name (`scan_replicas`)."""
        return {pool: scan_replicas(pool, self.control.is_ready) for pool in self.pools}

    def _add(self, pool: str, taken: set[str]) -> str:
        index = next(i for i in range(len(taken) + 1) if replica_name(pool, i) not in taken)
        name = replica_name(pool, index)
        clear_draining(self.run_dir, name)  # left by a planner stopped during a removal
        gpu = index % self.gpus if self.gpus else None
        started = time.monotonic()
        logger.info("planner: loading %s%s", name, f" on GPU {gpu}" if gpu is not None else "")
        load_replica(self.control, os.fspath(self.repository / pool), name, gpu=gpu,
                     parameters=self.parameters, timeout_s=self.load_timeout_s)
        logger.info("planner: %s ready in %.1f s", name, time.monotonic() - started)
        return name

    def _remove(self, worker: str) -> None:
        started = time.monotonic()
        mark_draining(self.run_dir, worker)
        logger.info("planner: draining %s", worker)
        self._wait_drained(worker)
        self.control.unload(worker)
        self._wait_gone(worker)
        # The router's list of ready workers may be `refresh_s` old: the marker keeps the
        # unloaded name out of its selections until that list has been re-probed.
        self._closed.wait(self.forget_s)
        clear_draining(self.run_dir, worker)
        logger.info("planner: removed %s in %.1f s", worker, time.monotonic() - started)

    def _wait_drained(self, worker: str) -> None:
        deadline = time.monotonic() + self.drain_timeout_s
        self._closed.wait(self.settle_s)
        idle_reads = 0
        while idle_reads < 2:
            if time.monotonic() >= deadline:
                logger.warning("planner: %s still busy after %.0f s; unloading it anyway", worker, self.drain_timeout_s)
                return
            if self._closed.wait(self.poll_s):
                raise TridentError(f"planner stopped while draining {worker}")
            try:
                busy = inflight(self.read_metrics(), worker)
            except TridentError as exc:
                logger.warning("planner: draining %s: %s", worker, exc)
                continue
            idle_reads = idle_reads + 1 if busy == 0 else 0  # None (no gauge yet) is not idle

    def _wait_gone(self, worker: str, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while self.control.is_ready(worker):
            if time.monotonic() >= deadline:
                raise TridentError(f"{worker} still ready {timeout_s:.0f} s after its unload")
            time.sleep(0.2)


def _sorted(workers: list[str]) -> list[str]:
    """In replica order: decode, decode_1, decode_2, ... (decode_10 after decode_9)."""
    return sorted(workers, key=lambda w: (parse_replica(w) or (w, 0))[1])
