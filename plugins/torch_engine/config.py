"""Configuration of the reference PyTorch engine: one dataclass, one path.

The same keys are used in config.pbtxt parameters, `trident serve` flags (as
`--kebab-case`) and environment variables (`TRIDENT_` + upper-case key). `from_mapping`
treats "" and unexpanded "${...}" values as unset, so a template config.pbtxt works as is.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from trident.core.errors import ConfigError
from trident.core.settings import load_settings

DTYPES = ("auto", "bfloat16", "float32", "float16")
OFFLOAD_POLICIES = ("write_through", "evict")  # kv_manager.tiers.cache.POLICIES
KV_TRANSPORTS = ("local", "nixl")


@dataclass(frozen=True, slots=True)
class TorchEngineConfig:
    model: str = ""  # GGUF file or Hugging Face directory; "" = the default SmolLM2 GGUF
    dtype: str = "auto"  # auto: bfloat16 where the CPU/GPU supports it, else float32
    device: str = "cpu"  # "cpu", "cuda", "cuda:N"
    block_size: int = 16
    num_blocks: int = 0  # 0: derive from kv_cache_mb
    kv_cache_mb: int = 256
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512  # per-step token budget (chunked prefill)
    max_model_len: int = 0  # 0: the model's own context length
    num_threads: int = 0  # torch intra-op threads; 0 = leave torch's default
    cpu_kernels: bool = True  # float32 on x86-64 CPUs: our packed GEMM and decode attention
    # CUDA devices only: decode-only steps replay CUDA graphs captured per (batch, context
    # width) bucket (plugins.torch_engine.cuda_graphs) instead of launching every kernel
    cuda_graphs: bool = True
    enable_prefix_caching: bool = True
    shareable_kv: bool = False  # allocate the pool so peers can map it (disaggregation)
    worker_id: str = "worker"
    lease_ttl_s: float = 30.0
    # how decode workers reach this pool: "local" (same node: shm / CUDA IPC) or "nixl" (any
    # node: NIXL READ, peers authenticated by TRIDENT_KV_SECRET[_FILE]); leases are then
    # released over TCP to kv_release_host, the node's address (loopback unless configured)
    kv_transport: str = "local"
    kv_release_host: str = "127.0.0.1"
    cache_dir: str = ""  # where converted weights are cached; "" = ~/.cache/trident
    kv_host_mb: int = 0  # host-memory KV tier below the pool (pinned on CUDA); 0 = none
    kv_disk_gb: float = 0.0  # disk KV tier; 0 = none
    kv_disk_dir: str = ""  # its directory ("" = ~/.cache/trident/kv); one subfolder per worker
    kv_disk_admit_after: int = 2  # offers (store + reuses) before a block is written to disk
    kv_offload: str = "write_through"  # or "evict": when blocks are copied to the tiers

    def validate(self) -> TorchEngineConfig:
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ConfigError(f"device must be 'cpu' or 'cuda[:N]', got {self.device!r}")
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("num_blocks", "kv_cache_mb", "max_model_len", "num_threads"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.num_blocks == 0 and self.kv_cache_mb == 0:
            raise ConfigError("set num_blocks or kv_cache_mb")
        if self.kv_host_mb < 0 or not 0 <= self.kv_disk_gb < float("inf"):
            raise ConfigError(f"kv_host_mb and kv_disk_gb must be >= 0, got {self.kv_host_mb}, {self.kv_disk_gb}")
        if self.kv_disk_admit_after < 1:
            raise ConfigError(f"kv_disk_admit_after must be >= 1, got {self.kv_disk_admit_after}")
        if self.kv_offload not in OFFLOAD_POLICIES:
            raise ConfigError(f"kv_offload must be one of {OFFLOAD_POLICIES}, got {self.kv_offload!r}")
        if self.kv_transport not in KV_TRANSPORTS:
            raise ConfigError(f"kv_transport must be one of {KV_TRANSPORTS}, got {self.kv_transport!r}")
        if not self.kv_release_host:
            raise ConfigError("kv_release_host must be an address of this node")
        if self.lease_ttl_s <= 0:
            raise ConfigError(f"lease_ttl_s must be positive, got {self.lease_ttl_s}")
        return self

    @classmethod
    def from_mapping(cls, params: Mapping[str, str], env: Mapping[str, str] | None = None) -> TorchEngineConfig:
        """Build from string parameters (config.pbtxt), then `TRIDENT_*` env vars override."""
        return load_settings(cls, params, env)
