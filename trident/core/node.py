"""This node's place in a multi-node cluster: one configuration, read by the worker models
(`plugins.triton.events`: publish over TCP, register in etcd), the router model
(`router_ensemble.triton.remote`: reach the workers of other nodes) and `trident serve`.

Every key is a model parameter or a `TRIDENT_<KEY>` environment variable (which wins). With
no `node_name` a server is a single node, as before: ipc sockets only, nothing registered.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from trident.core.errors import ConfigError
from trident.core.settings import load_settings


@dataclass(frozen=True, slots=True)
class NodeConfig:
    node_name: str = ""  # this node's name; its workers are <node_name>/<model> cluster-wide
    node_address: str = ""  # the address cross-node sockets bind to and other nodes dial
    node_grpc: str = ""  # host:port of this node's tritonserver, as other nodes reach it
    etcd: str = ""  # etcd client URL (http://host:2379): workers register, routers watch
    etcd_prefix: str = "/trident"
    etcd_ttl_s: int = 5  # a node that stops renewing drops out after this long
    remote_workers: str = ""  # routers: a static list of worker records (JSON, or a JSON file)

    def validate(self) -> NodeConfig:
        if self.node_name:
            if "/" in self.node_name or not self.node_name.strip():
                raise ConfigError(f"node_name: {self.node_name!r} must not contain '/'")
            if not self.node_address or self.node_address in ("0.0.0.0", "*", "::"):
                raise ConfigError("node_address: a node in a cluster needs its own address (not a wildcard)")
            if self.etcd and not self.node_grpc:
                raise ConfigError("node_grpc: workers registering in etcd need the node's Triton gRPC address")
        if self.etcd_ttl_s < 2:
            raise ConfigError(f"etcd_ttl_s must be >= 2, got {self.etcd_ttl_s}")
        return self

    @property
    def remote(self) -> bool:
        """Whether the router looks for workers on other nodes."""
        return bool(self.etcd or self.remote_workers)

    @classmethod
    def from_mapping(cls, params: Mapping[str, str], env: Mapping[str, str] | None = None) -> NodeConfig:
        return load_settings(cls, params, env)
