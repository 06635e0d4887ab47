"""Configuration of the TensorRT-LLM engine plugin: one dataclass, one path (as the torch engine's).

Keys are config.pbtxt parameters, `trident serve` flags and `TRIDENT_<KEY>` environment
variables (which win). The plugin is written against TensorRT-LLM's LLM API as shipped in
`TRTLLM_IMAGE` (`TRTLLM_VERSION`); `plugins.trtllm.setup` warns when another version imports.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from trident.core.errors import ConfigError
from trident.core.settings import load_settings

# The NGC image docker/Dockerfile.trtllm builds on, and the tensorrt_llm it ships (Triton's
# release compatibility matrix, container trtllm-python-py3, release 25.12).
TRTLLM_IMAGE = "nvcr.io/nvidia/tritonserver:25.12-trtllm-python-py3"
TRTLLM_VERSION = "1.1.0"

DTYPES = ("auto", "bfloat16", "float16", "float32")
# CacheTransceiverConfig.backend of the pinned version; "" = no disaggregation (no transceiver)
CACHE_TRANSCEIVER_BACKENDS = ("", "DEFAULT", "UCX", "NIXL", "MPI")
GUIDED_DECODING_BACKENDS = ("", "xgrammar", "llguidance")


@dataclass(frozen=True, slots=True)
class TrtllmEngineConfig:
    model: str = (
        ""  # Hugging Face directory, or a GGUF (written once as one); "" = the default SmolLM2
    )
    cache_dir: str = ""  # where the Hugging Face directory of a GGUF is written
    dtype: str = "auto"
    device: str = "cuda"  # "cuda" or "cuda:N" (the instance's GPU); TensorRT-LLM runs on CUDA only
    block_size: int = 32  # KvCacheConfig.tokens_per_block; the router's block size must match
    kv_cache_fraction: float = 0.85  # KvCacheConfig.free_gpu_memory_fraction
    kv_host_mb: int = 0  # KvCacheConfig.host_cache_size (secondary, host-memory blocks); 0 = none
    max_batch_size: int = 64
    max_num_tokens: int = 8192  # per-iteration token budget
    max_model_len: int = 0  # max_seq_len; 0 = the model's own context length
    enable_prefix_caching: bool = True  # KvCacheConfig.enable_block_reuse (needed for KV events)
    kv_event_buffer: int = 4096  # KvCacheConfig.event_buffer_max_size; 0 = no KV events
    worker_id: str = "worker"
    # "" = aggregated only; else the CacheTransceiverConfig backend: this worker then serves
    # context-only (hold_kv) and generation-only (kv_descriptor) requests.
    cache_transceiver: str = ""
    shareable_kv: bool = False  # a prefill worker: hand out descriptors for hold_kv requests
    lease_ttl_s: float = 30.0  # also the transceiver's kv_transfer_timeout_ms, where it has one
    kv_release_host: str = "127.0.0.1"
    guided_decoding_backend: str = "xgrammar"  # structured outputs; "" = refuse them
    stats_interval_s: float = 0.2  # how often the engine thread drains iteration stats and events
    tensor_parallel_size: int = 1

    def validate(self) -> TrtllmEngineConfig:
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if not self.device.startswith("cuda"):
            raise ConfigError(
                f"device: TensorRT-LLM runs on CUDA only ('cuda' or 'cuda:N'), got {self.device!r}"
            )
        for name in ("block_size", "max_batch_size", "max_num_tokens", "tensor_parallel_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0.0 < self.kv_cache_fraction <= 1.0:
            raise ConfigError(f"kv_cache_fraction must be in (0, 1], got {self.kv_cache_fraction}")
        for name in ("kv_host_mb", "max_model_len", "kv_event_buffer"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.cache_transceiver not in CACHE_TRANSCEIVER_BACKENDS:
            raise ConfigError(
                f"cache_transceiver must be one of {CACHE_TRANSCEIVER_BACKENDS[1:]} or '' (off), "
                f"got {self.cache_transceiver!r}"
            )
        if self.guided_decoding_backend not in GUIDED_DECODING_BACKENDS:
            raise ConfigError(
                f"guided_decoding_backend must be one of {GUIDED_DECODING_BACKENDS[1:]} or '' (none), "
                f"got {self.guided_decoding_backend!r}"
            )
        if self.shareable_kv and not self.cache_transceiver:
            raise ConfigError(
                "shareable_kv: a TensorRT-LLM prefill worker needs cache_transceiver (e.g. DEFAULT)"
            )
        if not self.lease_ttl_s > 0:
            raise ConfigError(f"lease_ttl_s must be positive, got {self.lease_ttl_s}")
        if not self.stats_interval_s > 0:
            raise ConfigError(f"stats_interval_s must be positive, got {self.stats_interval_s}")
        if not self.kv_release_host:
            raise ConfigError("kv_release_host must be an address of this node")
        return self

    @property
    def disaggregated(self) -> bool:
        return bool(self.cache_transceiver)

    @classmethod
    def from_mapping(
        cls, params: Mapping[str, str], env: Mapping[str, str] | None = None
    ) -> TrtllmEngineConfig:
        return load_settings(cls, params, env)
