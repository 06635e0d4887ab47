"""Build a vLLM `LLMEngine` for a `VllmEngineConfig`, and map our sampling onto vLLM's.

Who calls it: `plugins.vllm.engine.VllmEngine.start()` (the loop thread then owns the
engine) and `VllmEngine`'s loop (`sampling_params`). Everything vLLM-specific about building
the engine is here: in-process engine core, CPU thread binding, the KV cache size, the
Hugging Face directory of a GGUF (`plugins.vllm.model_dir`), vLLM's own KV event publisher.
"""

from __future__ import annotations

import logging
import os

from kv_manager.events import EngineEvents
from plugins.base import EngineInfo
from plugins.vllm.config import VllmEngineConfig
from plugins.vllm.kv_bridge import kv_layout
from plugins.vllm.model_dir import hf_model_dir
from plugins.vllm.structured import structured_outputs_params
from trident.core.model_files import hf_eos_token_ids, model_id_for, resolve_model_path
from trident.core.types import SamplingParams

logger = logging.getLogger(__name__)

MiB = 1 << 20
EVENTS_TOPIC = "kv-events"


def replay_endpoint(endpoint: str) -> str:
    """vLLM's replay (ROUTER) socket beside its PUB socket."""
    return endpoint + "-replay"


def transfer_config(config: VllmEngineConfig):
    """vLLM's KV connector is ours (`plugins.vllm.connector`): every vLLM worker can load a
    handed-off prompt; one with `shareable_kv` can also hand prompts off."""
    from vllm.config import KVTransferConfig

    return KVTransferConfig(
        kv_connector="TridentConnector",
        kv_connector_module_path="plugins.vllm.connector",
        kv_role="kv_both",
        kv_load_failure_policy="recompute",
        kv_connector_extra_config={
            "worker_id": config.worker_id,
            "model_id": model_id_for(resolve_model_path(config.model)),
            "device": config.device,
            "shareable_kv": config.shareable_kv,
            "kv_staging_mb": config.kv_staging_mb,
            "lease_ttl_s": config.lease_ttl_s,
        },
    )


def engine_args(config: VllmEngineConfig, model_dir: str):
    from vllm.config import KVEventsConfig
    from vllm.engine.arg_utils import EngineArgs

    events = None
    if config.kv_events_endpoint:
        events = KVEventsConfig(
            enable_kv_cache_events=True,
            publisher="zmq",
            endpoint=config.kv_events_endpoint,
            replay_endpoint=replay_endpoint(config.kv_events_endpoint),
            topic=EVENTS_TOPIC,
        )
    return EngineArgs(
        model=model_dir,
        served_model_name=model_id_for(resolve_model_path(config.model)),
        dtype=engine_dtype(config),
        block_size=config.block_size,
        max_num_seqs=config.max_num_seqs,
        max_num_batched_tokens=config.max_num_batched_tokens,
        max_model_len=config.max_model_len or None,
        enable_prefix_caching=config.enable_prefix_caching,
        enforce_eager=config.enforce_eager,
        kv_cache_memory_bytes=config.kv_cache_mb * MiB,
        generation_config="vllm",  # no sampling defaults from the model dir: the request says
        skip_tokenizer_init=True,  # token ids in and out: the router tokenizes
        seed=0,
        disable_log_stats=False,
        kv_events_config=events,
        kv_transfer_config=transfer_config(config),
    )


def engine_dtype(config: VllmEngineConfig) -> str:
    """"auto" as our torch engine means it on CPU: bfloat16 only where the CPU computes in it
    (AVX512-BF16 / AMX); elsewhere float32, since vLLM's own "auto" takes bfloat16 on every
    CPU, which runs ~6x slower than float32 on an AVX2-only one (measured here)."""
    if config.dtype != "auto" or config.device != "cpu":
        return config.dtype
    import torch

    from plugins.torch_engine.setup import resolve_dtype

    return str(resolve_dtype("auto", torch.device("cpu"))).removeprefix("torch.")


def build_llm_engine(config: VllmEngineConfig, stat_logger):
    """(LLMEngine, EngineInfo): vLLM's engine core in this process, stepped by the caller's
    thread (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, vLLM's `InprocClient`)."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm.v1.engine.llm_engine import LLMEngine

    model_dir = hf_model_dir(config.model, config.cache_dir)
    llm = LLMEngine.from_engine_args(
        engine_args(config, model_dir), stat_loggers=[stat_logger], enable_multiprocessing=False
    )
    return llm, engine_info(config, llm, model_dir)


def engine_info(config: VllmEngineConfig, llm, model_dir: str) -> EngineInfo:
    vc = llm.vllm_config
    mc = vc.model_config
    model_id = model_id_for(resolve_model_path(config.model))
    layout = kv_layout(vc, model_id)
    return EngineInfo(
        model_id=model_id,
        block_size=vc.cache_config.block_size,
        num_blocks=int(vc.cache_config.num_gpu_blocks or 0),
        max_model_len=mc.max_model_len,
        vocab_size=mc.get_vocab_size(),
        eos_token_ids=hf_eos_token_ids(model_dir),
        kv_layout=layout,
        device=config.device,
        kv_events=EngineEvents(config.kv_events_endpoint, replay_endpoint(config.kv_events_endpoint), "tokens")
        if config.kv_events_endpoint
        else None,
    )


def sampling_params(sampling: SamplingParams, kv_transfer_params: dict | None = None):
    """vLLM's SamplingParams for ours: deltas of token ids, no detokenizing (the router does);
    `kv_transfer_params` for our KV connector (`plugins.vllm.handoff`)."""
    from vllm import SamplingParams as VllmSampling
    from vllm.sampling_params import RequestOutputKind

    return VllmSampling(
        n=1,
        max_tokens=sampling.max_tokens,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        top_k=sampling.top_k if sampling.top_k > 0 else 0,
        seed=sampling.seed,
        stop_token_ids=list(sampling.stop_token_ids),
        min_tokens=sampling.min_tokens,
        ignore_eos=sampling.ignore_eos,
        presence_penalty=sampling.presence_penalty,
        frequency_penalty=sampling.frequency_penalty,
        repetition_penalty=sampling.repetition_penalty,
        min_p=sampling.min_p,
        logit_bias=dict(sampling.logit_bias) or None,
        logprobs=sampling.logprobs,
        prompt_logprobs=sampling.prompt_logprobs,
        structured_outputs=structured_outputs_params(sampling.structured_outputs),
        detokenize=False,
        output_kind=RequestOutputKind.DELTA,
        extra_args={"kv_transfer_params": kv_transfer_params} if kv_transfer_params else None,
    )
