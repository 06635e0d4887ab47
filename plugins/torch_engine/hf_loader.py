"""Hugging Face directory (config.json + *.safetensors) -> `ModelConfig` + fp32 weights.

Called by `loader.load_checkpoint` only. Reads Llama, Qwen2 and Mistral checkpoints,
single-file or sharded (`model.safetensors.index.json`).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from plugins.torch_engine.model_config import (
    LLAMA,
    MISTRAL,
    QWEN2,
    SUPPORTED_ARCHITECTURES,
    ModelConfig,
)
from trident.core.errors import ModelLoadError
from trident.core.model_files import hf_eos_token_ids, model_id_for, read_json

logger = logging.getLogger(__name__)

_LOG_EVERY = 64
_SKIPPED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some old checkpoints saved


def read_config(model_dir: str) -> ModelConfig:
    """The model config from config.json; unsupported architectures raise `ModelLoadError`."""
    path = os.path.join(model_dir, "config.json")
    cfg = read_json(path)
    archs = cfg.get("architectures") or []
    arch = archs[0] if archs else None
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelLoadError(
            f"{path}: architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    if arch == LLAMA and (cfg.get("attention_bias") or cfg.get("mlp_bias")):
        raise ModelLoadError(f"{path}: Llama with attention_bias/mlp_bias is not supported")

    def need(key: str) -> Any:
        if cfg.get(key) is None:
            raise ModelLoadError(f"{path}: {key} is missing")
        return cfg[key]

    hidden, heads = int(need("hidden_size")), int(need("num_attention_heads"))
    rope = cfg.get("rope_parameters") if isinstance(cfg.get("rope_parameters"), dict) else {}
    rope_theta = cfg.get("rope_theta", rope.get("rope_theta", 10000.0))
    scaling = cfg.get("rope_scaling") or {k: v for k, v in rope.items() if k != "rope_theta"}
    if scaling and scaling.get("rope_type", scaling.get("type", "default")) == "default":
        scaling = None
    max_pos = int(need("max_position_embeddings"))
    window = _sliding_window(cfg, arch)
    if window and window < max_pos:
        logger.info(
            "%s: sliding window %d; capping the context at it so full attention is exact",
            model_dir,
            window,
        )
        max_pos = window
    bos = cfg.get("bos_token_id")
    return ModelConfig(
        model_id=model_id_for(model_dir),
        architecture=arch,
        vocab_size=int(need("vocab_size")),
        hidden_size=hidden,
        intermediate_size=int(need("intermediate_size")),
        num_layers=int(need("num_hidden_layers")),
        num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or hidden // heads),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=float(rope_theta),
        rope_scaling=dict(scaling) if scaling else None,
        max_position_embeddings=max_pos,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        bos_token_id=bos if isinstance(bos, int) else None,
        eos_token_ids=hf_eos_token_ids(model_dir),
    ).validate(path)


def load_weights(model_dir: str, config: ModelConfig) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors files, as fp32; a tied `lm_head.weight` is dropped."""
    from safetensors import SafetensorError, safe_open

    weights: dict[str, torch.Tensor] = {}
    for path in safetensors_files(model_dir):
        try:
            with safe_open(path, framework="pt") as f:
                for name in f.keys():
                    if name.endswith(_SKIPPED_SUFFIXES) or (
                        config.tie_word_embeddings and name == "lm_head.weight"
                    ):
                        continue
                    weights[name] = f.get_tensor(name).to(torch.float32)
                    if len(weights) % _LOG_EVERY == 0:
                        logger.info("reading %s: %d tensors", model_dir, len(weights))
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise ModelLoadError(f"{path}: cannot read safetensors file: {exc}") from exc
    return weights


def safetensors_files(model_dir: str) -> list[str]:
    """The checkpoint's shard files: from the index if there is one, else every *.safetensors."""
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelLoadError(f"{index}: weight_map is missing or empty")
        files = [os.path.join(model_dir, name) for name in sorted(set(weight_map.values()))]
        for path in files:
            if not os.path.isfile(path):
                raise ModelLoadError(
                    f"{path}: shard listed in {os.path.basename(index)} is missing"
                )
        return files
    files = sorted(
        os.path.join(model_dir, n) for n in os.listdir(model_dir) if n.endswith(".safetensors")
    )
    if not files:
        raise ModelLoadError(
            f"{model_dir}: no *.safetensors files (pytorch_model.bin checkpoints are not supported; "
            "re-save the model with safe_serialization=True)"
        )
    return files


def _sliding_window(cfg: dict[str, Any], arch: str) -> int | None:
    window = cfg.get("sliding_window")
    if not isinstance(window, int):
        return None
    if arch == MISTRAL or (arch == QWEN2 and cfg.get("use_sliding_window")):
        return window
    return None
