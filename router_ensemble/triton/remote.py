"""The router's reach beyond its own tritonserver: workers registered by other nodes.

`RemoteWorkers` holds where each remote worker (`<node>/<model>`) is: from etcd
(`trident.core.discovery.EtcdWorkers`, re-read at most every second) or from a static list
(`NodeConfig.remote_workers`). It gives

- each pool's remote workers to that pool's `WorkerDirectory` (`pool_workers`), beside the
  local replicas found by BLS probes; a worker whose etcd lease expired is no longer listed,
  so the pool drops it and the router forgets its blocks;
- the subscriber endpoint of a remote worker (`endpoint`: TCP, CURVE keys from the cluster
  secret) to `PoolRouting`;
- the gRPC address and model name of a remote worker (`where`) to `GrpcWorkerClient`.

`NodeRoutedClient` is the orchestration's one `WorkerClient`: `<node>/<model>` names go over
gRPC to their node, plain model names over BLS to this server.

Who calls it: `RouterModel.__init__` builds it when `NodeConfig.remote` is set; request
threads call everything else (no Triton call, no thread of its own).
"""

from __future__ import annotations

from router_ensemble.orchestration.ports import ChunkStream, WorkerClient
from router_ensemble.routing.subscriber import WorkerEndpoint
from trident.core.cluster_secret import curve_keys, require_secret
from trident.core.discovery import EtcdClient, EtcdWorkers, WorkerRecord, static_records
from trident.core.node import NodeConfig
from trident.core.types import GenerateRequest


class RemoteWorkers:
    """See the module docstring. Thread-safe."""

    def __init__(self, node: NodeConfig) -> None:
        secret = require_secret("a router reaching workers on other nodes")
        self.curve = curve_keys(secret)
        self._etcd = EtcdWorkers(EtcdClient(node.etcd, timeout_s=1.0), secret, prefix=node.etcd_prefix) if node.etcd else None
        self._static = {r.worker: r for r in static_records(node.remote_workers)}

    def records(self) -> dict[str, WorkerRecord]:
        return self._etcd.records() if self._etcd is not None else dict(self._static)

    def pool_workers(self, pool: str) -> list[str]:
        return sorted(w for w, r in self.records().items() if r.pool == pool)

    def where(self, worker: str) -> tuple[str, str] | None:
        record = self.records().get(worker)
        return None if record is None else (record.grpc, record.model)

    def endpoint(self, worker: str) -> WorkerEndpoint | None:
        record = self.records().get(worker)
        if record is None:
            return None
        return WorkerEndpoint(worker, record.events, reports_load=True, curve=self.curve)

    def close(self) -> None:
        if self._etcd is not None:
            self._etcd.client.close()


def is_remote(worker: str) -> bool:
    return "/" in worker


class NodeRoutedClient:
    """A `WorkerClient` over two: remote (`<node>/<model>`) and local workers."""

    def __init__(self, local: WorkerClient, remote: WorkerClient) -> None:
        self.local = local
        self.remote = remote

    def generate(self, worker: str, request: GenerateRequest) -> ChunkStream:
        return (self.remote if is_remote(worker) else self.local).generate(worker, request)

    def abort(self, worker: str, request_id: str) -> None:
        (self.remote if is_remote(worker) else self.local).abort(worker, request_id)
