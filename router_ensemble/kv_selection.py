"""KV-aware routing wired into the router model: router, event subscriber, worker discovery.

`KvRouting` puts the parts together for one pool of workers (the decode pool):

- a `KvRouter` (index, load table, the configured policy: `kv`, `round_robin`, `random`,
  `least_loaded`; every policy sees the same index and loads, so they can be compared);
- a `KvEventSubscriber` listening to each worker's ipc socket (`trident.kv_endpoints`: the
  socket name is the worker's model name, so discovery needs nothing but model names);
- a background thread ("kv-routing") that re-reads the `WorkerDirectory` (which replicas are
  ready) every `refresh_s`, subscribes to new workers and drops unloaded ones (their index
  entries go with them), and flushes the routing metrics;
- `selector`: the orchestrator's `WorkerSelector`; candidates are the directory's ready
  workers minus those the router removed (they left or stopped reporting);
- `watch(client)`: the orchestrator's `WorkerClient`, wrapped so that a request on a worker
  that disappears ends with an error instead of hanging (`watched_client`).

Who calls it: `router_ensemble.triton_router.RouterModel` builds it in `initialize` with
`from_params`, calls `start()`, and `close()` in `finalize` (idempotent).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from pathlib import Path

from router_ensemble.orchestrator import WorkerClient
from router_ensemble.router import KvRouter, KvSelector
from router_ensemble.routing_config import RouterConfig
from router_ensemble.routing_metrics import RoutingMetricsExporter
from router_ensemble.subscriber import KvEventSubscriber, WorkerEndpoint
from router_ensemble.watched_client import WatchedWorkerClient
from router_ensemble.worker_pool import WorkerDirectory
from trident.kv_endpoints import events_dir, events_endpoint

logger = logging.getLogger(__name__)


class KvRouting:
    """See the module docstring. Thread-safe: request threads use `selector` and the watched
    client; the background thread owns subscriptions and metrics flushing."""

    def __init__(
        self,
        directory: WorkerDirectory,
        config: RouterConfig,
        socket_dir: Path,
        *,
        exporter_name: str = "",
        refresh_s: float = 1.0,
    ) -> None:
        self.directory = directory
        self.config = config
        self.socket_dir = socket_dir
        self.refresh_s = refresh_s
        self.router = KvRouter(config)
        self.subscriber = KvEventSubscriber(self.router)
        self.exporter = RoutingMetricsExporter(exporter_name, self.router) if exporter_name else None
        self.selector = KvSelector(
            self.router,
            workers=self._ready_workers,
            on_decision=self.exporter.observe if self.exporter is not None else None,
        )
        self._subscribed: set[str] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def from_params(
        cls, directory: WorkerDirectory, params: Mapping[str, str], *, metrics_name: str = ""
    ) -> KvRouting:
        """Settings from the router model's parameters / `TRIDENT_ROUTER_*` (`RouterConfig`)
        and the socket directory from `TRIDENT_KV_EVENTS_DIR` (`trident.kv_endpoints`)."""
        return cls(directory, RouterConfig.from_mapping(params), events_dir(params), exporter_name=metrics_name)

    def watch(self, client: WorkerClient) -> WatchedWorkerClient:
        return WatchedWorkerClient(client, self.router.removals)

    def start(self) -> KvRouting:
        if self._thread is None:
            self.subscriber.start()
            self._thread = threading.Thread(target=self._loop, name="kv-routing", daemon=True)
            self._thread.start()
            logger.info(
                "kv routing: policy=%s block_size=%d events from %s",
                self.config.policy, self.config.block_size, self.socket_dir,
            )
        return self

    def _ready_workers(self) -> tuple[str, ...]:
        """Request threads: the directory's ready workers, re-probed at once if it knows none
        (workers that became ready since the last scan, e.g. right after start)."""
        ready = self.directory.workers()
        if not ready:
            self.directory.invalidate()
            ready = self.directory.workers()
        return ready

    def sync_workers(self) -> tuple[str, ...]:
        """Subscribe to workers that became ready, drop those that are gone; returns the ready ones."""
        ready = self.directory.workers()
        for worker in ready:
            if worker not in self._subscribed:
                endpoint = events_endpoint(worker, self.socket_dir)
                self.subscriber.add_worker(WorkerEndpoint(worker, endpoint))
                self._subscribed.add(worker)
        for worker in self._subscribed - set(ready):
            logger.info("kv routing: worker=%s is no longer ready; dropping it", worker)
            self.subscriber.remove_worker(worker)
            self._subscribed.discard(worker)
        return ready

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.sync_workers()
            except Exception:  # discovery must keep running whatever one probe does
                logger.exception("kv routing: worker discovery failed")
            if self.exporter is not None:
                self.exporter.flush()
            self._stop.wait(self.refresh_s)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        self.subscriber.close()
        if self.exporter is not None:
            self.exporter.close()
