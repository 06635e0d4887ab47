"""KV-aware routing wired into the router model: router, event subscriber, worker discovery.

`KvRouting` puts the parts together for one pool of workers (the decode pool):

- a `KvRouter` (index, load table, the configured policy: `kv`, `round_robin`, `random`,
  `least_loaded`; every policy sees the same index and loads, so they can be compared);
- a `KvEventSubscriber` listening to each worker's ipc socket (`trident.core.endpoints`: the
  socket name is the worker's model name, so discovery needs nothing but model names);
- worker discovery on request threads: before each decision the `WorkerDirectory` (which
  replicas are ready; it re-probes at most every couple of seconds) is compared with the
  subscriptions, new workers are subscribed and unloaded ones dropped (their index entries go
  with them);
- `selector`: the orchestrator's `WorkerSelector`; candidates are the directory's ready
  workers minus those the router removed (they left or stopped reporting);
- `watch(client)`: the orchestrator's `WorkerClient`, wrapped so that a request on a worker
  that disappears ends with an error instead of hanging (`watched_client`);
- `after_request()`: the router model calls it on the request thread once the final response
  is out; it pushes the routing metrics to the server.

Nothing here calls `pb_utils` from a thread of its own: the router's stub aborted
(boost::interprocess::lock_exception) when a background thread started in `initialize` probed
models and updated metrics. The subscriber's thread only reads ZMQ sockets.

Who calls it: `router_ensemble.triton.model.RouterModel` builds it in `initialize` with
`from_params`, calls `start()`, `after_request()` at the end of each request, and `close()`
in `finalize` (idempotent).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from pathlib import Path

from router_ensemble.orchestration.orchestrator import WorkerClient
from router_ensemble.routing.config import RouterConfig
from router_ensemble.routing.directory import WorkerDirectory
from router_ensemble.routing.router import KvRouter, KvSelector
from router_ensemble.routing.subscriber import KvEventSubscriber, WorkerEndpoint
from router_ensemble.triton.metrics_exporter import RoutingMetricsExporter
from router_ensemble.triton.watched_client import WatchedWorkerClient
from trident.core.endpoints import events_dir, events_endpoint

logger = logging.getLogger(__name__)


class KvRouting:
    """See the module docstring. Thread-safe: every method may be called from any request
    thread; subscriptions change under a lock, metric flushes never wait for each other."""

    def __init__(
        self,
        directory: WorkerDirectory,
        config: RouterConfig,
        socket_dir: Path,
        *,
        exporter_name: str = "",
    ) -> None:
        self.directory = directory
        self.config = config
        self.socket_dir = socket_dir
        self.router = KvRouter(config)
        self.subscriber = KvEventSubscriber(self.router)
        self.exporter = RoutingMetricsExporter(exporter_name, self.router) if exporter_name else None
        self.selector = KvSelector(
            self.router,
            workers=self._ready_workers,
            on_decision=self.exporter.observe if self.exporter is not None else None,
        )
        self._subscribed: tuple[str, ...] = ()  # the ready workers of the last sync
        self._sync_lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._started = False

    @classmethod
    def from_params(
        cls, directory: WorkerDirectory, params: Mapping[str, str], *, metrics_name: str = ""
    ) -> KvRouting:
        """Settings from the router model's parameters / `TRIDENT_ROUTER_*` (`RouterConfig`)
        and the socket directory from `TRIDENT_KV_EVENTS_DIR` (`trident.core.endpoints`)."""
        return cls(directory, RouterConfig.from_mapping(params), events_dir(params), exporter_name=metrics_name)

    def watch(self, client: WorkerClient) -> WatchedWorkerClient:
        return WatchedWorkerClient(client, self.router.removals)

    def start(self) -> KvRouting:
        if not self._started:
            self.subscriber.start()
            self._started = True
            logger.info(
                "kv routing: policy=%s block_size=%d events from %s",
                self.config.policy, self.config.block_size, self.socket_dir,
            )
        return self

    def _ready_workers(self) -> tuple[str, ...]:
        """Request threads, before each decision: the directory's ready workers (re-probed at
        once if it knows none, e.g. right after start), with subscriptions brought in line."""
        ready = self.directory.workers()
        if not ready:
            self.directory.invalidate()
            ready = self.directory.workers()
        return self.sync_workers(ready)

    def sync_workers(self, ready: tuple[str, ...] | None = None) -> tuple[str, ...]:
        """Subscribe to workers that became ready, drop those that are gone; returns the ready ones."""
        if ready is None:
            ready = self.directory.workers()
        if ready == self._subscribed:  # every decision passes here: nothing changed, no lock
            return ready
        with self._sync_lock:
            for worker in ready:
                if worker not in self._subscribed:
                    endpoint = events_endpoint(worker, self.socket_dir)
                    self.subscriber.add_worker(WorkerEndpoint(worker, endpoint, reports_load=True))
            for worker in self._subscribed:
                if worker not in ready:
                    logger.info("kv routing: worker=%s is no longer ready; dropping it", worker)
                    self.subscriber.remove_worker(worker)
            self._subscribed = ready
        return ready

    def after_request(self) -> None:
        """Request thread, after its final response: push routing metrics to the server. If
        another thread is flushing, skip: its flush or the next one carries this request."""
        if self.exporter is None or not self._flush_lock.acquire(blocking=False):
            return
        try:
            self.exporter.flush()
        finally:
            self._flush_lock.release()

    def close(self) -> None:
        self._started = False
        self.subscriber.close()
        if self.exporter is not None:
            self.exporter.close()
