"""Configuration of the vLLM engine plugin: one dataclass, one path (as the torch engine's).

Keys are config.pbtxt parameters, `trident serve` flags and `TRIDENT_<KEY>` environment
variables (which win). The defaults suit vLLM's CPU build: its CPU attention takes block
sizes that are multiples of 32, so the router and every worker of a vLLM pool use 32.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from trident.core.errors import ConfigError
from trident.core.settings import load_settings

DTYPES = ("auto", "bfloat16", "float32", "float16")


@dataclass(frozen=True, slots=True)
class VllmEngineConfig:
    model: str = ""  # GGUF file or Hugging Face directory; "" = the default SmolLM2 GGUF
    dtype: str = "auto"  # auto: bfloat16 where the CPU computes in it, else float32 (as ours)
    device: str = "cpu"  # "cpu" (vLLM's CPU build) or "cuda[:N]" (a CUDA build of vLLM)
    block_size: int = 32
    kv_cache_mb: int = 256
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int = 2048  # 0: the model's own context length
    enable_prefix_caching: bool = True
    enforce_eager: bool = False  # True: skip torch.compile (starts in seconds, decodes slower)
    num_threads: int = 0  # torch threads of the engine's loop thread; 0 = torch's default
    worker_id: str = "worker"
    cache_dir: str = ""  # where the Hugging Face directory of a GGUF is written
    kv_events_endpoint: str = ""  # where vLLM's own ZMQ publisher binds ("" = no events)
    shareable_kv: bool = False  # a prefill worker: stage held prompts in a shareable pool
    kv_staging_mb: int = 128  # that pool (prompts between prefill and the decode worker's pull)
    lease_ttl_s: float = 30.0

    def validate(self) -> VllmEngineConfig:
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ConfigError(f"device must be 'cpu' or 'cuda[:N]', got {self.device!r}")
        for name in ("block_size", "kv_cache_mb", "max_num_seqs", "max_num_batched_tokens", "kv_staging_mb"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.device == "cpu" and self.block_size % 32:
            raise ConfigError(
                f"block_size must be a multiple of 32 for vLLM on CPU (its CPU attention), got {self.block_size}"
            )
        if not self.lease_ttl_s > 0:
            raise ConfigError(f"lease_ttl_s must be positive, got {self.lease_ttl_s}")
        if self.num_threads < 0:
            raise ConfigError(f"num_threads must be >= 0, got {self.num_threads}")
        if self.max_model_len < 0:
            raise ConfigError(f"max_model_len must be >= 0, got {self.max_model_len}")
        return self

    @classmethod
    def from_mapping(cls, params: Mapping[str, str], env: Mapping[str, str] | None = None) -> VllmEngineConfig:
        return load_settings(cls, params, env)
