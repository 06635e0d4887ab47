"""KV-aware routing wired into the router model: one `PoolRouting` per worker pool.

A `PoolRouting` puts the parts together for one pool (`decode`, `prefill`):

- a `KvRouter` (index, load table, the configured policy: `kv`, `round_robin`, `random`,
  `least_loaded`; every policy sees the same index and loads, so they can be compared);
- a `KvEventSubscriber` listening to each worker's ipc socket (`trident.core.endpoints`: the
  socket name is the worker's model name, so discovery needs nothing but model names). It
  also finds the pool's sockets in the socket directory itself (`discover`, every half
  second), so the router follows a worker's events from the moment the worker binds its
  socket, before any request is routed;
- `selector`, the orchestration's `WorkerSelector`: a `KvSelector` over the pool's
  `WorkerDirectory` (which replicas are ready; it re-probes at most every couple of
  seconds on request threads); before each decision the ready list is compared with the
  subscriptions, new workers are subscribed and unloaded ones dropped (their index entries
  go with them);
- `watch(client)`: the orchestration's `WorkerClient`, wrapped so that a request on a worker
  of this pool that disappears ends with an error instead of hanging (`watched_client`),
  with the router's notion of "gone" (left, silent, unloaded).

A worker that becomes ready before the subscriber has its state (its snapshot is in flight)
would be judged on an empty index entry, and a returning user's history held in its host
or disk tier would be missed. So the request that first sees a worker ready waits, at most
`resync_timeout_s`, until the subscriber has synced it.

Both pools use the same cost, so prefill workers are chosen by cache overlap and load as
decode workers are. Nothing here calls `pb_utils` from a thread of its own: the router's stub
aborted (boost::interprocess::lock_exception) when a background thread started in
`initialize` probed models and updated metrics. The subscriber threads only read ZMQ sockets.

Who calls it: `router_ensemble.triton.model.RouterModel` builds one per pool in `initialize`,
calls `start()`, and `close()` in `finalize` (idempotent).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

from router_ensemble.orchestration.ports import WorkerClient
from router_ensemble.routing.config import RoutingConfig
from router_ensemble.routing.directory import WorkerDirectory
from router_ensemble.routing.router import Decision, KvRouter, KvSelector
from router_ensemble.routing.subscriber import KvEventSubscriber, WorkerEndpoint
from router_ensemble.triton.remote import RemoteWorkers, is_remote
from router_ensemble.triton.watched_client import WatchedWorkerClient
from trident.core.endpoints import SUFFIX, events_endpoint
from trident.core.names import parse_replica

logger = logging.getLogger(__name__)


class PoolRouting:
    """See the module docstring. Thread-safe: every method may be called from any request
    thread; subscriptions change under a lock."""

    def __init__(
        self,
        directory: WorkerDirectory,
        config: RoutingConfig,
        socket_dir: Path,
        *,
        on_decision: Callable[[Decision], None] | None = None,
        remote: RemoteWorkers | None = None,
    ) -> None:
        self.pool = directory.pool
        self.remote = remote
        self.directory = directory
        self.config = config
        self.socket_dir = socket_dir
        self.router = KvRouter(config)
        self.subscriber = KvEventSubscriber(self.router, discover=self.discover)
        self.selector = KvSelector(self.router, directory, on_workers=self.sync_workers, on_decision=on_decision)
        self._subscribed: tuple[str, ...] = ()  # the ready workers of the last sync
        self._sync_lock = threading.Lock()
        self._started = False

    def watch(self, client: WorkerClient) -> WatchedWorkerClient:
        return WatchedWorkerClient(client, self.router.removals)

    def start(self) -> PoolRouting:
        if not self._started:
            self.subscriber.start()
            self._started = True
            logger.info(
                "kv routing: pool=%s policy=%s block_size=%d events from %s",
                self.pool, self.config.policy, self.config.block_size, self.socket_dir,
            )
        return self

    def endpoint(self, worker: str) -> WorkerEndpoint | None:
        """Where `worker` publishes: its ipc socket here, or (`<node>/<model>`) the TCP
        endpoint its node registered; None for a remote worker no longer registered."""
        if self.remote is not None and is_remote(worker):
            return self.remote.endpoint(worker)
        return self._local_endpoint(worker)

    def _local_endpoint(self, worker: str) -> WorkerEndpoint:
        return WorkerEndpoint(worker, events_endpoint(worker, self.socket_dir), reports_load=True)

    def discover(self) -> list[WorkerEndpoint]:
        """The pool's workers whose event sockets exist in the socket directory (called on
        the subscriber thread; reads the directory only)."""
        found = []
        try:
            names = [entry.name for entry in self.socket_dir.iterdir()]
        except OSError:
            return found
        for name in names:
            stem = name[: -len(SUFFIX)]
            if name.endswith(SUFFIX) and (parse_replica(stem) or ("", 0))[0] == self.pool:
                found.append(self._local_endpoint(stem))
        return found

    def sync_workers(self, ready: tuple[str, ...]) -> None:
        """Subscribe to workers that became ready (and wait, bounded, until they are synced),
        drop those that are gone."""
        if ready == self._subscribed:  # every decision passes here: nothing changed, no lock
            return
        with self._sync_lock:
            new = []
            for worker in ready:
                spec = None if worker in self._subscribed else self.endpoint(worker)
                if spec is not None:
                    self.subscriber.add_worker(spec)
                    new.append(worker)
            for worker in self._subscribed:
                if worker not in ready:
                    logger.info("kv routing: worker=%s is no longer ready; dropping it", worker)
                    self.subscriber.remove_worker(worker)
            if new and not self.subscriber.wait_synced(new, self.config.resync_timeout_s):
                logger.warning(
                    "kv routing: pool=%s worker(s) %s not synced after %.1fs; routing on what is known",
                    self.pool, ", ".join(new), self.config.resync_timeout_s,
                )
            self._subscribed = ready

    def close(self) -> None:
        self._started = False
        self.subscriber.close()
