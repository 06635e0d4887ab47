"""TensorRT-LLM iteration stats -> EngineStats, the plugin's config, and choosing it as a worker's engine.

The stats dicts are written from TensorRT-LLM's documented iteration stats (`LLM.get_stats`;
the trtllm-serve `/metrics` example of TensorRT-LLM 1.1.0). Building the engine object needs no
tensorrt_llm: it is imported by `start()` only.
"""

from __future__ import annotations

import dataclasses

import pytest

from plugins.triton.engines import build_engine
from plugins.trtllm.config import TRTLLM_IMAGE, TRTLLM_VERSION, TrtllmEngineConfig
from plugins.trtllm.engine import TrtllmEngine
from plugins.trtllm.stats import StatsTracker
from trident.core.errors import ConfigError, EngineError

ITERATION = {
    "gpuMemUsage": 76665782272,
    "iter": 154,
    "iterLatencyMS": 7.00688362121582,
    "kvCacheStats": {
        "allocNewBlocks": 3126,
        "allocTotalBlocks": 3126,
        "cacheHitRate": 0.00128,
        "freeNumBlocks": 101253,
        "maxNumBlocks": 101256,
        "missedBlocks": 3121,
        "reusedBlocks": 4,
        "tokensPerBlock": 32,
        "usedNumBlocks": 3,
    },
    "numActiveRequests": 1,
    "inflightBatchingStats": {
        "numContextRequests": 0,
        "numGenRequests": 1,
        "numCtxTokens": 0,
        "numPausedRequests": 0,
    },
}


def test_stats_from_iterations_and_the_engines_own_counts() -> None:
    tracker = StatsTracker(32)
    tracker.record([{"iter": 153}, ITERATION])
    tracker.finished(prompt_tokens=100, cached_tokens=64, generated=20)
    tracker.publish(running=1, waiting=2, prefill_tokens=300, held_blocks=5, leases=2)
    s = tracker.snapshot()
    assert (s.running, s.waiting, s.active_blocks, s.total_blocks) == (1, 2, 3, 101256)
    assert (s.prompt_tokens, s.cached_prompt_tokens, s.generated_tokens) == (100, 64, 20)
    assert (s.active_prefill_tokens, s.held_blocks, s.leases) == (300, 5, 2)
    # idle: TensorRT-LLM reports no iteration, its last one must not keep blocks "used"
    tracker.publish(running=0, waiting=0, prefill_tokens=0)
    assert tracker.snapshot().active_blocks == 0 and tracker.snapshot().total_blocks == 101256


def test_stats_before_any_iteration_use_the_created_event_count() -> None:
    tracker = StatsTracker(32)
    tracker.total_blocks = 512
    tracker.record(["not a dict", {"kvCacheStats": {"usedNumBlocks": "x"}}])
    tracker.publish(running=1, waiting=0, prefill_tokens=0)
    assert tracker.snapshot().total_blocks == 512 and tracker.snapshot().active_blocks == 0


def test_config_validation_names_the_field() -> None:
    assert TrtllmEngineConfig().validate().block_size == 32
    for bad, field in (
        ({"device": "cpu"}, "device"),
        ({"block_size": 0}, "block_size"),
        ({"kv_cache_fraction": 1.5}, "kv_cache_fraction"),
        ({"cache_transceiver": "TCP"}, "cache_transceiver"),
        ({"shareable_kv": True}, "shareable_kv"),
        ({"guided_decoding_backend": "outlines"}, "guided_decoding_backend"),
        ({"lease_ttl_s": 0.0}, "lease_ttl_s"),
    ):
        with pytest.raises(ConfigError, match=field):
            dataclasses.replace(TrtllmEngineConfig(), **bad).validate()
    cfg = TrtllmEngineConfig.from_mapping(
        {"cache_transceiver": "DEFAULT", "shareable_kv": "true"}, env={}
    )
    assert cfg.disaggregated and cfg.shareable_kv
    assert TRTLLM_VERSION == "1.1.0" and TRTLLM_IMAGE.endswith(":25.12-trtllm-python-py3")


def test_trtllm_is_a_worker_engine_choice(monkeypatch) -> None:
    monkeypatch.setenv("TRIDENT_ENGINE", "trtllm")
    monkeypatch.setenv("TRIDENT_DEVICE", "cuda")
    args = {"model_instance_kind": "GPU", "model_instance_device_id": "1"}
    engine = build_engine("decode_1", {"engine": "torch", "device": "cpu"}, args)
    assert isinstance(engine, TrtllmEngine)
    assert engine.config.worker_id == "decode_1" and engine.config.device == "cuda:1"
    # not started: no TensorRT-LLM was imported; the contract's half-started cases hold
    with pytest.raises(EngineError, match="not started"):
        engine.info()
    assert engine.take_events() == [] and engine.stats().running == 0
    engine.abort("nothing")
    engine.shutdown()
    engine.shutdown()
