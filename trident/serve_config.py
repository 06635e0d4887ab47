"""Configuration of `trident serve`: one dataclass, flags and environment variables.

Every field is a `--kebab-case` flag and a `TRIDENT_UPPER_CASE` environment variable;
a flag beats the environment, which beats the default. The engine settings (`model`,
`dtype`, `kv_cache_mb`, `num_threads`, `device`, the KV tiers' `kv_host_mb`, `kv_disk_gb`,
`kv_disk_dir`) use the same names as
`plugins.torch_engine.config.TorchEngineConfig`: the launcher exports them to tritonserver's
environment, where every worker's engine config picks them up. Empty / 0 means "leave the
value in the model's config.pbtxt".
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from trident.core.errors import ConfigError
from trident.core.flags import add_flags, from_namespace
from trident.core.node import NodeConfig

ENV_PREFIX = "TRIDENT_"
LOG_LEVELS = ("debug", "info", "warning", "error")
ENGINE_DTYPES = ("", "auto", "bfloat16", "float32", "float16")
ROUTER_POLICIES = ("kv", "round_robin", "random", "least_loaded")  # router_ensemble.routing.policies.POLICIES
ROLES = ("both", "router", "worker")
ENGINES = ("torch", "vllm", "trtllm")  # plugins.triton.engines.ENGINES
TRTLLM_BLOCK_SIZE = 32  # plugins.trtllm.config.TrtllmEngineConfig.block_size
VLLM_BLOCK_SIZE = 32  # plugins.vllm.config.VllmEngineConfig.block_size

# field name -> help text; the order is the order of `trident serve --help`.
_HELP = {
    "model": "GGUF file or Hugging Face directory ('' = default SmolLM2-135M-Instruct)",
    "engine": "worker engine: torch (ours), vllm (needs `make setup-vllm`) or trtllm (NGC TensorRT-LLM image, GPU; "
    "docker/Dockerfile.trtllm) ('' = model config, torch)",
    "host": "address the HTTP, gRPC and metrics endpoints bind to",
    "http_port": "HTTP port (0 = pick a free port)",
    "grpc_port": "gRPC port (0 = pick a free port)",
    "metrics_port": "Prometheus /metrics port (0 = pick a free port)",
    "decode": "number of decode workers (decode, decode_1, ...)",
    "router_policy": "routing policy: kv, round_robin, random, least_loaded ('' = router config, kv)",
    "prefill": "number of prefill workers (prefill, prefill_1, ...); 0 = aggregated serving only",
    "disagg_threshold": "prefill remotely from this many uncached prompt tokens (0 = never, -1 = router config)",
    "dtype": "engine dtype: auto, bfloat16, float32, float16 ('' = model config)",
    "device": "engine device: cpu or cuda ('' = model config); cuda pins decode_i to GPU i",
    "kv_cache_mb": "KV pool size per worker in MiB (0 = model config)",
    "num_threads": "torch threads per worker (0 = model config)",
    "kv_host_mb": "host-memory KV tier per worker in MiB, below the pool (0 = model config, none)",
    "kv_disk_gb": "disk KV tier per worker in GiB; survives restarts (0 = model config, none)",
    "kv_disk_dir": "directory of the disk KV tier, one subfolder per worker ('' = ~/.cache/trident/kv)",
    "log_level": "log level: debug, info, warning, error",
    "tritonserver": "path of the tritonserver binary ('' = search PATH, then the nvidia-pytriton wheel)",
    "model_repository": "model repository ('' = this checkout's model_repository/)",
    "startup_timeout_s": "seconds to wait for the server and all models to become ready",
    "server_log": "file for tritonserver's own log ('' = a file in the run directory, '-' = this terminal)",
    "openai_port": "port of the OpenAI-compatible frontend (-1 = do not start it, 0 = a free port)",
    "api_key": "Bearer token the OpenAI frontend requires ('' = none)",
    "planner": "also run the planner (`python -m planner`; its settings: TRIDENT_PLANNER_* variables)",
    "admin_key_file": "write the model-repository key to this file (0600) for a planner run separately ('' = do not)",
    "role": "what this node runs: both (router and workers), router (no local workers), worker (no router, no frontend)",
    "node_name": "this node's name in a multi-node cluster ('' = a single node); its workers are <node>/<model>",
    "node_address": "this node's address: cross-node sockets bind here and other nodes dial it",
    "etcd": "etcd client URL (http://host:2379): workers register there, routers find other nodes' workers",
    "remote_workers": "routers: a static list of other nodes' workers (JSON, or a JSON file) instead of etcd",
    "restart_stubs": "load a model again when its Python stub process dies (trident.supervisor)",
}


@dataclass(frozen=True, slots=True)
class ServeConfig:
    """What `trident serve` starts. Built by `from_args` (CLI) or directly (tests)."""

    model: str = ""
    engine: str = ""
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    decode: int = 1
    router_policy: str = ""
    prefill: int = 0
    disagg_threshold: int = -1
    dtype: str = ""
    device: str = ""
    kv_cache_mb: int = 0
    num_threads: int = 0
    kv_host_mb: int = 0
    kv_disk_gb: float = 0.0
    kv_disk_dir: str = ""
    log_level: str = "info"
    tritonserver: str = ""
    model_repository: str = ""
    startup_timeout_s: float = 600.0
    server_log: str = ""
    openai_port: int = 9000
    api_key: str = ""
    planner: bool = False
    admin_key_file: str = ""
    role: str = "both"
    node_name: str = ""
    node_address: str = ""
    etcd: str = ""
    remote_workers: str = ""
    restart_stubs: bool = True

    def validate(self) -> ServeConfig:
        """Return self, or raise `ConfigError` naming the first bad field."""
        for name in ("http_port", "grpc_port", "metrics_port"):
            port = getattr(self, name)
            if not 0 <= port <= 65535:
                raise ConfigError(f"{name} must be in [0, 65535], got {port}")
        if self.engine and self.engine not in ENGINES:
            raise ConfigError(f"engine must be one of {ENGINES}, got {self.engine!r}")
        if self.engine == "trtllm" and not self.device.startswith("cuda"):
            raise ConfigError(f"device: --engine trtllm runs on CUDA only; set --device cuda, got {self.device!r}")
        if self.role not in ROLES:
            raise ConfigError(f"role must be one of {ROLES}, got {self.role!r}")
        # a router-only node, or a worker node of prefill workers, may have no decode worker
        if self.decode < (0 if self.role == "router" or (self.role == "worker" and self.prefill) else 1):
            raise ConfigError(
                f"decode must be >= 1 (0 only with role=router, or role=worker with prefill workers), got {self.decode}"
            )
        if self.role == "router" and not (self.etcd or self.remote_workers) and self.decode == 0:
            raise ConfigError("role=router without local workers needs --etcd or --remote-workers to find workers")
        if self.role == "worker" and not self.node_name:
            raise ConfigError("role=worker: set --node-name and --node-address so that routers on other nodes reach it")
        if self.router_policy and self.router_policy not in ROUTER_POLICIES:
            raise ConfigError(f"router_policy must be one of {ROUTER_POLICIES}, got {self.router_policy!r}")
        if self.prefill < 0:
            raise ConfigError(f"prefill must be >= 0, got {self.prefill}")
        if self.disagg_threshold < -1:
            raise ConfigError(f"disagg_threshold must be >= 0 (or -1 for the router's config), got {self.disagg_threshold}")
        if self.dtype not in ENGINE_DTYPES:
            raise ConfigError(f"dtype must be one of {ENGINE_DTYPES[1:]}, got {self.dtype!r}")
        if self.device and not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ConfigError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        if self.kv_cache_mb < 0:
            raise ConfigError(f"kv_cache_mb must be >= 0, got {self.kv_cache_mb}")
        if self.num_threads < 0:
            raise ConfigError(f"num_threads must be >= 0, got {self.num_threads}")
        if self.kv_host_mb < 0 or not 0 <= self.kv_disk_gb < float("inf"):
            raise ConfigError(f"kv_host_mb and kv_disk_gb must be >= 0, got {self.kv_host_mb}, {self.kv_disk_gb}")
        if self.log_level not in LOG_LEVELS:
            raise ConfigError(f"log_level must be one of {LOG_LEVELS}, got {self.log_level!r}")
        if self.startup_timeout_s <= 0:
            raise ConfigError(f"startup_timeout_s must be positive, got {self.startup_timeout_s}")
        if not self.host:
            raise ConfigError("host must not be empty")
        if not -1 <= self.openai_port <= 65535:
            raise ConfigError(f"openai_port must be -1 (off) or in [0, 65535], got {self.openai_port}")
        if self.node_name and self.host not in (self.node_address, "0.0.0.0"):
            raise ConfigError(
                f"host: other nodes' routers reach node {self.node_name}'s workers at {self.node_address or '?'}; "
                "bind --host to --node-address"
            )
        self.node().validate()
        return self

    def node(self) -> NodeConfig:
        grpc = f"{self.node_address}:{self.grpc_port}"  # the launcher exports the port it binds
        return NodeConfig(self.node_name, self.node_address, grpc, self.etcd, remote_workers=self.remote_workers)

    def engine_env(self) -> dict[str, str]:
        """`TRIDENT_*` variables for tritonserver's environment (engine and router settings)."""
        env = {"TRIDENT_LOG_LEVEL": self.log_level}
        if self.engine:
            env["TRIDENT_ENGINE"] = self.engine
        if self.engine == "vllm":  # vLLM's CPU attention takes multiples of 32 tokens per block
            env["TRIDENT_ROUTER_BLOCK_SIZE"] = str(VLLM_BLOCK_SIZE)
        if self.engine == "trtllm":  # TensorRT-LLM's tokens_per_block: the router hashes blocks alike
            env["TRIDENT_ROUTER_BLOCK_SIZE"] = str(TRTLLM_BLOCK_SIZE)
            if self.prefill:  # prefill and decode workers then hand KV over through TensorRT-LLM's transceiver
                env["TRIDENT_CACHE_TRANSCEIVER"] = "DEFAULT"
        if self.model:
            env["TRIDENT_MODEL"] = os.path.abspath(os.path.expanduser(self.model))
        if self.dtype:
            env["TRIDENT_DTYPE"] = self.dtype
        if self.device:
            env["TRIDENT_DEVICE"] = "cpu" if self.device == "cpu" else "cuda"
        if self.kv_cache_mb:
            env["TRIDENT_KV_CACHE_MB"] = str(self.kv_cache_mb)
        if self.num_threads:
            env["TRIDENT_NUM_THREADS"] = str(self.num_threads)
        if self.kv_host_mb:
            env["TRIDENT_KV_HOST_MB"] = str(self.kv_host_mb)
        if self.kv_disk_gb:
            env["TRIDENT_KV_DISK_GB"] = str(self.kv_disk_gb)
        if self.kv_disk_dir:
            env["TRIDENT_KV_DISK_DIR"] = os.path.abspath(os.path.expanduser(self.kv_disk_dir))
        if self.router_policy:
            env["TRIDENT_ROUTER_POLICY"] = self.router_policy
        if self.disagg_threshold >= 0:
            env["TRIDENT_ROUTER_DISAGG_THRESHOLD"] = str(self.disagg_threshold)
        for key in ("node_name", "node_address", "etcd", "remote_workers"):
            if getattr(self, key):
                env[ENV_PREFIX + key.upper()] = getattr(self, key)
        if self.node_name:  # decode workers on other nodes pull prefilled KV through NIXL
            env["TRIDENT_KV_TRANSPORT"] = "nixl"
            env["TRIDENT_KV_RELEASE_HOST"] = self.node_address
        return env

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ServeConfig:
        """Defaults overridden by `TRIDENT_*` variables (no flags)."""
        return cls.from_args([], env)

    @classmethod
    def from_args(cls, argv: Sequence[str], env: Mapping[str, str] | None = None) -> ServeConfig:
        """Parse `trident serve` flags; unset flags fall back to `TRIDENT_*`, then defaults."""
        env = os.environ if env is None else env
        args = build_parser(argparse.ArgumentParser(prog="trident serve", allow_abbrev=False)).parse_args(list(argv))
        return cls.from_namespace(args, env)

    @classmethod
    def from_namespace(cls, args: argparse.Namespace, env: Mapping[str, str]) -> ServeConfig:
        return from_namespace(cls, args, env, ENV_PREFIX)


def build_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add one flag per `ServeConfig` field (default None: the environment decides)."""
    return add_flags(parser, ServeConfig, _HELP, ENV_PREFIX)
