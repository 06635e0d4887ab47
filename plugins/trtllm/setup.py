"""Building TensorRT-LLM's `LLM` for a `TrtllmEngineConfig` (the only module, with
`plugins.trtllm.engine`, that imports tensorrt_llm; both import it lazily).

Called by `TrtllmEngine.start()` on the caller's thread. The arguments are those of the LLM
API (`tensorrt_llm/llmapi/llm_args.py`) of TensorRT-LLM 1.1.0 (`TRTLLM_VERSION`), PyTorch
backend: `KvCacheConfig` (`tokens_per_block`, `enable_block_reuse`, `event_buffer_max_size`
for KV events, `free_gpu_memory_fraction`, `host_cache_size` for the host-memory level),
`CacheTransceiverConfig` for disaggregation, `enable_iter_perf_stats` for `get_stats`,
`skip_tokenizer_init` (token ids in and out: the router tokenizes). An argument the installed
version does not have fails the start with a `ConfigError` naming it, rather than being
dropped: the block size, for one, must be the router's.
"""

from __future__ import annotations

import logging
import os
from types import SimpleNamespace
from typing import Any

from kv_manager.layout import KVLayout
from plugins.base import EngineInfo
from plugins.trtllm.config import TRTLLM_VERSION, TrtllmEngineConfig
from plugins.trtllm.handoff import layout_of
from trident.core.errors import ConfigError
from trident.core.model_files import hf_eos_token_ids, model_id_for, read_json

logger = logging.getLogger(__name__)

MiB = 1 << 20


def model_dir(config: TrtllmEngineConfig) -> str:
    """The Hugging Face directory to load: the model setting's, or one written from a GGUF."""
    from plugins.vllm.model_dir import hf_model_dir  # writes no vLLM code, only the directory

    return hf_model_dir(config.model, config.cache_dir)


def _known(cls: Any, kwargs: dict[str, Any], where: str) -> dict[str, Any]:
    fields = getattr(cls, "model_fields", None)
    if fields is not None:
        missing = [k for k in kwargs if k not in fields]
        if missing:
            raise ConfigError(
                f"{where}.{missing[0]}: not in this tensorrt_llm's {cls.__name__} (the plugin is written for "
                f"TensorRT-LLM {TRTLLM_VERSION})"
            )
    return kwargs


def llm_kwargs(config: TrtllmEngineConfig, directory: str) -> dict[str, Any]:
    """Arguments of `tensorrt_llm.LLM` (KvCacheConfig and CacheTransceiverConfig built)."""
    from tensorrt_llm.llmapi import CacheTransceiverConfig, KvCacheConfig

    kv: dict[str, Any] = {
        "tokens_per_block": config.block_size,
        "enable_block_reuse": config.enable_prefix_caching,
        "event_buffer_max_size": config.kv_event_buffer if config.enable_prefix_caching else 0,
        "free_gpu_memory_fraction": config.kv_cache_fraction,
    }
    if config.kv_host_mb:
        kv["host_cache_size"] = config.kv_host_mb * MiB
    kwargs: dict[str, Any] = {
        "model": directory,
        "skip_tokenizer_init": True,
        "dtype": config.dtype,
        "max_batch_size": config.max_batch_size,
        "max_num_tokens": config.max_num_tokens,
        "tensor_parallel_size": config.tensor_parallel_size,
        "enable_iter_perf_stats": True,
        "kv_cache_config": KvCacheConfig(**_known(KvCacheConfig, kv, "kv_cache_config")),
    }
    if config.guided_decoding_backend:
        kwargs["guided_decoding_backend"] = config.guided_decoding_backend
    if config.max_model_len:
        kwargs["max_seq_len"] = config.max_model_len
    if config.disaggregated:
        transceiver: dict[str, Any] = {"backend": config.cache_transceiver}
        if "kv_transfer_timeout_ms" in getattr(CacheTransceiverConfig, "model_fields", {}):
            transceiver["kv_transfer_timeout_ms"] = int(config.lease_ttl_s * 1000)
        else:
            logger.warning(
                "this tensorrt_llm's cache transceiver has no transfer timeout: an unclaimed "
                "prefill keeps its KV in TensorRT-LLM's pool after its lease expires"
            )
        kwargs["cache_transceiver_config"] = CacheTransceiverConfig(**transceiver)
        # TensorRT-LLM's disaggregated context servers run without the overlap scheduler.
        kwargs["disable_overlap_scheduler"] = config.shareable_kv
    return kwargs


def build_llm(config: TrtllmEngineConfig) -> tuple[Any, EngineInfo]:
    """TensorRT-LLM's `LLM` and the engine's info (`num_blocks` 0 until TensorRT-LLM's
    "created" KV event or first iteration stats say how many blocks it allocated)."""
    if config.device.startswith("cuda:") and "CUDA_VISIBLE_DEVICES" not in os.environ:
        # The instance's GPU: TensorRT-LLM (and the executor processes it may spawn) use device 0.
        os.environ["CUDA_VISIBLE_DEVICES"] = config.device.split(":", 1)[1]
    import tensorrt_llm
    from tensorrt_llm import LLM

    version = getattr(tensorrt_llm, "__version__", "?")
    if not str(version).startswith(TRTLLM_VERSION):
        logger.warning(
            "tensorrt_llm %s imported; this plugin is written and pinned for %s",
            version,
            TRTLLM_VERSION,
        )
    directory = model_dir(config)
    hf = read_json(os.path.join(directory, "config.json"))
    kwargs = llm_kwargs(config, directory)
    try:
        llm = LLM(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"tensorrt_llm.LLM refused the engine settings: {exc}") from exc
    return llm, engine_info(config, directory, hf)


def api() -> SimpleNamespace:
    """The request-side classes of the LLM API the engine builds per request, and
    `sampling_params(kwargs, vocab_size)`: TensorRT-LLM's `SamplingParams` from
    `plugins.trtllm.sampling`'s plain keyword arguments."""
    from tensorrt_llm import SamplingParams
    from tensorrt_llm.disaggregated_params import DisaggregatedParams
    from tensorrt_llm.sampling_params import GuidedDecodingParams

    api = SimpleNamespace(
        SamplingParams=SamplingParams,
        DisaggregatedParams=DisaggregatedParams,
        GuidedDecodingParams=GuidedDecodingParams,
    )
    api.sampling_params = lambda kwargs, vocab_size: sampling_params(api, kwargs, vocab_size)
    return api


def sampling_params(api: SimpleNamespace, kwargs: dict[str, Any], vocab_size: int) -> Any:
    """TensorRT-LLM's `SamplingParams` from `plugins.trtllm.sampling`'s plain keyword arguments."""
    kwargs = dict(kwargs)
    if (
        "embedding_bias" in kwargs
    ):  # {token id: bias} -> the [vocab] float32 tensor TensorRT-LLM adds
        import torch

        bias = torch.zeros(vocab_size, dtype=torch.float32)
        for token, value in kwargs["embedding_bias"].items():
            bias[token] = value
        kwargs["embedding_bias"] = bias
    if "guided_decoding" in kwargs:
        kwargs["guided_decoding"] = api.GuidedDecodingParams(**kwargs["guided_decoding"])
    return api.SamplingParams(**kwargs)


def engine_info(
    config: TrtllmEngineConfig, directory: str, hf: dict[str, Any], num_blocks: int = 0
) -> EngineInfo:
    model_id = model_id_for(config.model or directory)
    layout: KVLayout = layout_of(hf, config.block_size, config.dtype, model_id)
    max_len = config.max_model_len or int(hf.get("max_position_embeddings") or 0)
    if max_len <= 0:
        raise ConfigError(
            "max_model_len: the model's config.json has no max_position_embeddings; set it"
        )
    vocab = int(hf.get("vocab_size") or 0)
    if vocab <= 0:
        raise ConfigError(f"{directory}/config.json: no vocab_size")
    return EngineInfo(
        model_id=model_id,
        block_size=config.block_size,
        num_blocks=num_blocks,
        max_model_len=max_len,
        vocab_size=vocab,
        eos_token_ids=hf_eos_token_ids(directory),
        kv_layout=layout,
        device=config.device,
    )
