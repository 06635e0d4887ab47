"""Worker side of KV-aware routing: publish the engine's KV events and load from a worker model.

`WorkerEvents` owns one `kv_manager.publisher.KVEventPublisher` bound to the worker's ipc
socket (`trident.core.endpoints`) and one thread ("kv-events-<worker>") that every `poll_s`
moves `engine.take_events()` onto the wire and every `report_s` publishes `engine.stats()` as
a load report (the router drops a worker whose reports stop). Binding the socket announces
the worker; `close()` says "leave". An engine that publishes its own KV events (vLLM,
`EngineInfo.kv_events`) keeps its stream; the announce and load reports name it, so the router
listens to both.

On a node of a cluster (`trident.core.node.NodeConfig.node_name` set) the publisher binds TCP
on the node's address instead, secured with CURVE keys from the cluster secret, and, with
`etcd` set, the worker registers `<node>/<model>` there under a lease
(`trident.core.discovery.EtcdRegistration`), so routers on other nodes find its gRPC address
and its event stream. `close()` revokes that lease first.

Who calls it: `plugins.triton.model.WorkerModel.start()` calls `start(engine)` once the engine
runs; `WorkerModel.shutdown()` calls `close()` before stopping the engine, so the router
stops choosing the worker first. The engine owns its blocks; this class only reads events
and stats (both thread-safe engine calls).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from kv_manager.publisher import KVEventPublisher
from plugins.base import Engine
from trident.core.cluster_secret import curve_keys, require_secret
from trident.core.discovery import EtcdClient, EtcdRegistration, WorkerRecord
from trident.core.endpoints import events_dir, events_endpoint, release_endpoint
from trident.core.errors import ConfigError
from trident.core.names import parse_replica
from trident.core.node import NodeConfig
from trident.core.settings import load_settings

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class WorkerEventsConfig:
    """`kv_events` (publish or not), `kv_events_poll_ms`, `kv_load_report_ms`: model parameters
    or `TRIDENT_<KEY>` environment variables (which win). The socket directory: `kv_endpoints`."""

    kv_events: bool = True
    kv_events_poll_ms: float = 10.0
    kv_load_report_ms: float = 500.0

    def validate(self) -> WorkerEventsConfig:
        for key in ("kv_events_poll_ms", "kv_load_report_ms"):
            value = getattr(self, key)
            if not math.isfinite(value) or value <= 0:
                raise ConfigError(f"{key} must be positive, got {value}")
        return self

    @classmethod
    def from_mapping(cls, params: Mapping[str, str], env: Mapping[str, str] | None = None) -> WorkerEventsConfig:
        return load_settings(cls, params, env)


class WorkerEvents:
    """Publishes one worker's KV events and load; see the module docstring for who calls it."""

    def __init__(
        self,
        worker: str,
        config: WorkerEventsConfig | None = None,
        params: Mapping[str, str] | None = None,
        endpoint: str = "",
    ) -> None:
        self.worker = worker
        self.config = config or WorkerEventsConfig()
        self._params = dict(params or {})
        self._endpoint = endpoint
        self.publisher: KVEventPublisher | None = None
        self.registration: EtcdRegistration | None = None
        self.node = NodeConfig.from_mapping(self._params)
        self._engine: Engine | None = None
        # Set by the worker model: False while the worker cannot deliver responses; its load
        # reports stop then, so routers drop it after their worker_timeout_s.
        self.healthy: Callable[[], bool] = lambda: True
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def from_params(cls, worker: str, params: Mapping[str, str]) -> WorkerEvents:
        return cls(worker, WorkerEventsConfig.from_mapping(params), params)

    @property
    def endpoint(self) -> str:
        return self.publisher.endpoint if self.publisher is not None else ""

    def start(self, engine: Engine) -> None:
        """Bind the sockets (announcing the worker) and start publishing. Idempotent."""
        if not self.config.kv_events or self.publisher is not None:
            return
        node, curve, secret = self.node, None, None
        if node.node_name:  # other nodes' routers listen: TCP on this node's address, CURVE
            secret = require_secret("a worker on a cluster node")
            curve = curve_keys(secret)
            endpoint = self._endpoint or f"tcp://{node.node_address}:0"
        else:
            endpoint = self._endpoint or events_endpoint(self.worker, events_dir(self._params))
        self._engine = engine
        info = engine.info()
        self.publisher = KVEventPublisher(
            self.worker, endpoint, block_size=info.block_size, engine_events=info.kv_events, curve=curve
        )
        self.publisher.report_load(engine.stats())
        self._thread = threading.Thread(target=self._loop, name=f"kv-events-{self.worker}", daemon=True)
        self._thread.start()
        if node.node_name and node.etcd and secret is not None:
            replica = parse_replica(self.worker)
            record = WorkerRecord(f"{node.node_name}/{self.worker}", replica[0] if replica else self.worker,
                                  node.node_grpc, self.publisher.endpoint)
            self.registration = EtcdRegistration(
                EtcdClient(node.etcd), record, secret, prefix=node.etcd_prefix, ttl_s=node.etcd_ttl_s
            ).start()

    def _loop(self) -> None:
        engine, publisher = self._engine, self.publisher
        assert engine is not None and publisher is not None
        poll_s = self.config.kv_events_poll_ms / 1000.0
        report_s = self.config.kv_load_report_ms / 1000.0
        next_report = 0.0
        while not self._stop.is_set():
            try:
                publisher.publish(engine.take_events())
                now = time.monotonic()
                if now >= next_report and self.healthy():
                    publisher.report_load(engine.stats())
                    next_report = now + report_s
            except Exception:  # a lost batch makes the router resync; keep the worker up
                logger.exception("worker=%s: publishing KV events failed", self.worker)
            self._stop.wait(poll_s)

    def close(self) -> None:
        """Leave etcd, publish what is left, send "leave", close the sockets. Safe to call twice."""
        registration, self.registration = self.registration, None
        if registration is not None:
            registration.close()
            registration.client.close()
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        publisher, self.publisher = self.publisher, None
        if publisher is None:
            return
        try:
            if self._engine is not None:
                publisher.publish(self._engine.take_events())
        finally:
            publisher.close()
            release_endpoint(publisher.endpoint)
