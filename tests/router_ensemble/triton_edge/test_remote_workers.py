"""The router's view of other nodes from a static list: pools, endpoints (CURVE), gRPC
addresses, the directory listing them beside local replicas, and the client that sends
`<node>/<model>` names over gRPC and the rest over BLS. And `trident serve`'s node roles."""

from __future__ import annotations

import json

import pytest

from router_ensemble.routing.directory import WorkerDirectory
from router_ensemble.triton.remote import NodeRoutedClient, RemoteWorkers
from trident.core.errors import ConfigError
from trident.core.node import NodeConfig
from trident.serve_config import ServeConfig

RECORDS = [
    {"worker": "node-b/decode", "pool": "decode", "grpc": "10.0.0.2:8001", "events": "tcp://10.0.0.2:5600"},
    {"worker": "node-b/decode_1", "pool": "decode", "grpc": "10.0.0.2:8001", "events": "tcp://10.0.0.2:5602"},
    {"worker": "node-c/prefill", "pool": "prefill", "grpc": "10.0.0.3:8001", "events": "tcp://10.0.0.3:5600"},
]


@pytest.fixture
def remote(monkeypatch) -> RemoteWorkers:
    monkeypatch.setenv("TRIDENT_KV_SECRET", "remote-workers-test-secret-00000")
    return RemoteWorkers(NodeConfig(remote_workers=json.dumps(RECORDS)))


def test_static_remote_workers_by_pool_with_their_endpoints(remote: RemoteWorkers) -> None:
    assert remote.pool_workers("decode") == ["node-b/decode", "node-b/decode_1"]
    assert remote.pool_workers("prefill") == ["node-c/prefill"]
    assert remote.where("node-b/decode_1") == ("10.0.0.2:8001", "decode_1")
    spec = remote.endpoint("node-c/prefill")
    assert spec is not None and spec.endpoint == "tcp://10.0.0.3:5600" and spec.curve is remote.curve
    assert remote.where("node-z/decode") is None and remote.endpoint("node-z/decode") is None
    directory = WorkerDirectory("decode", probe=lambda name: name == "decode", refresh_s=0.0,
                                remote=lambda: remote.pool_workers("decode"))
    assert directory.workers() == ("decode", "node-b/decode", "node-b/decode_1")


def test_remote_workers_need_the_cluster_secret(monkeypatch) -> None:
    monkeypatch.delenv("TRIDENT_KV_SECRET", raising=False)
    monkeypatch.delenv("TRIDENT_KV_SECRET_FILE", raising=False)
    with pytest.raises(ConfigError, match="cluster secret"):
        RemoteWorkers(NodeConfig(remote_workers=json.dumps(RECORDS)))


def test_node_names_go_over_grpc_and_model_names_over_bls() -> None:
    calls = []

    class Client:
        def __init__(self, name: str) -> None:
            self.name = name

        def generate(self, worker, request):
            calls.append((self.name, worker))
            return iter(())

        def abort(self, worker, request_id):
            calls.append((self.name, "abort", worker))

    client = NodeRoutedClient(Client("bls"), Client("grpc"))
    client.generate("decode_1", None)
    client.generate("node-b/decode", None)
    client.abort("node-b/decode", "r")
    assert calls == [("bls", "decode_1"), ("grpc", "node-b/decode"), ("grpc", "abort", "node-b/decode")]


@pytest.mark.parametrize("kwargs, match", [
    ({"role": "worker"}, "role=worker: set --node-name"),
    ({"role": "router", "decode": 0}, "needs --etcd or --remote-workers"),
    ({"decode": 0}, "0 only with role=router"),
    ({"role": "boss"}, "role must be one of"),
    ({"node_name": "b", "node_address": "10.0.0.2"}, "bind --host to --node-address"),
    ({"node_name": "b", "node_address": "0.0.0.0", "host": "0.0.0.0"}, "not a wildcard"),
    ({"node_name": "a/b", "node_address": "10.0.0.2", "host": "10.0.0.2"}, "must not contain"),
])
def test_node_roles_and_addresses_are_checked(kwargs, match) -> None:
    with pytest.raises(ConfigError, match=match):
        ServeConfig(**kwargs).validate()


def test_a_router_only_node_and_a_worker_node_validate() -> None:
    ServeConfig(role="router", decode=0, etcd="http://127.0.0.1:2379").validate()
    cfg = ServeConfig(role="worker", node_name="b", node_address="10.0.0.2", host="10.0.0.2", etcd="http://e:2379")
    env = cfg.validate().engine_env()
    assert env["TRIDENT_NODE_NAME"] == "b" and env["TRIDENT_KV_TRANSPORT"] == "nixl"
    assert env["TRIDENT_KV_RELEASE_HOST"] == "10.0.0.2" and env["TRIDENT_ETCD"] == "http://e:2379"
