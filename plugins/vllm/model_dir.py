"""A Hugging Face directory for vLLM from a user's `model` setting (GGUF file or HF directory).

vLLM loads Hugging Face directories. The default model ships as a GGUF (Q4_1), so
`hf_model_dir` writes the same fp32 weights our torch engine serves (dequantized by
`plugins.torch_engine.loader`, which equals transformers' GGUF loader) as a directory:
`model.safetensors`, `config.json` (LlamaForCausalLM-style) and `generation_config.json`. No
tokenizer: a vLLM worker takes and returns token ids (`skip_tokenizer_init`), the router
tokenizes; whoever runs vLLM's own server on the directory adds the tokenizer files
(`router_ensemble.text.tokenizer.export_hf_tokenizer`, as `benchmarks.serve_vs_vllm` does).

The directory is cached beside the torch engine's weight cache, keyed like it (path, size,
mtime) and written atomically (a temporary directory renamed into place), so concurrent
workers starting at once build it once or see a finished one. A Hugging Face directory is
returned as it is.

Who calls it: `plugins.vllm.engine.VllmEngine.start()` (and the benchmarks).
"""

from __future__ import annotations

import json
import logging
import os
import shutil

from trident.core.model_files import resolve_model_path

logger = logging.getLogger(__name__)

_FORMAT = 2  # bump when what the directory holds changes


def hf_model_dir(model: str, cache_dir: str = "") -> str:
    """The Hugging Face directory to load for `model` ("" = the default SmolLM2 GGUF)."""
    path = resolve_model_path(model)
    if os.path.isdir(path):
        return path
    target = _cache_dir_for(path, cache_dir)
    if os.path.isfile(os.path.join(target, "model.safetensors")):
        return target
    _export(path, target)
    return target


def _cache_dir_for(gguf_path: str, cache_dir: str) -> str:
    from plugins.torch_engine.loader import cache_entry

    return cache_entry(gguf_path, cache_dir, "hf", _FORMAT)


def _export(gguf_path: str, target: str) -> None:
    from safetensors.torch import save_file

    from plugins.torch_engine.loader import load_checkpoint

    checkpoint = load_checkpoint(gguf_path)
    config = checkpoint.config
    tmp = f"{target}.tmp.{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        weights = dict(checkpoint.weights)
        if config.tie_word_embeddings:
            weights.pop("lm_head.weight", None)
        save_file({k: v.contiguous() for k, v in weights.items()}, os.path.join(tmp, "model.safetensors"),
                  metadata={"format": "pt", "source": gguf_path})
        _write_json(os.path.join(tmp, "config.json"), hf_config(config))
        _write_json(os.path.join(tmp, "generation_config.json"), {
            "bos_token_id": config.bos_token_id,
            "eos_token_id": list(config.eos_token_ids),
        })
        try:
            os.rename(tmp, target)
        except OSError:  # another worker finished first: keep its directory
            if not os.path.isfile(os.path.join(target, "model.safetensors")):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("wrote Hugging Face directory %s for %s", target, gguf_path)


def hf_config(config) -> dict:
    """`config.json` of a `plugins.torch_engine.model_config.ModelConfig`."""
    model_type = {"Qwen2ForCausalLM": "qwen2", "MistralForCausalLM": "mistral"}.get(config.architecture, "llama")
    eos = list(config.eos_token_ids)
    return {
        "architectures": [config.architecture],
        "model_type": model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": config.rope_scaling,
        "max_position_embeddings": config.max_position_embeddings,
        "tie_word_embeddings": config.tie_word_embeddings,
        "attention_bias": config.attention_bias,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": eos[0] if len(eos) == 1 else eos,
        "torch_dtype": "float32",
    }


def _write_json(path: str, data: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
