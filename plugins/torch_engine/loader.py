"""Load a Llama-family checkpoint (GGUF file or Hugging Face directory) as fp32 tensors.

The engine calls `load_checkpoint` once at start, on its own thread, and owns the returned
tensors (it casts and moves them to its device). Weights use Hugging Face Llama names
(`model.layers.{i}.self_attn.q_proj.weight`, ...), whatever the file format, so the model
code has one naming scheme; `lm_head.weight` is present only when the embeddings are untied.

GGUF weights are dequantized with the `gguf` package (exactly what transformers' GGUF
loader produces) and cached as a safetensors file under `cache_dir` keyed by the GGUF's
path, size and mtime, so a restart skips dequantization.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from plugins.torch_engine import gguf_loader, hf_loader
from plugins.torch_engine.model_config import ModelConfig
from trident.core.errors import ModelLoadError
from trident.core.model_files import model_id_for, read_gguf, resolve_model_path

logger = logging.getLogger(__name__)

_CACHE_FORMAT = 1  # bump when the cached tensors' meaning changes


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A model's config and its fp32 weights (Hugging Face names), as `load_checkpoint` returns them."""

    config: ModelConfig
    weights: dict[str, torch.Tensor]


def load_checkpoint(model_path: str, cache_dir: str = "") -> Checkpoint:
    """Load a GGUF file or a Hugging Face directory ("" = the default SmolLM2 GGUF)."""
    path = resolve_model_path(model_path)
    start = time.perf_counter()
    if os.path.isdir(path):
        config = hf_loader.read_config(path)
        weights = hf_loader.load_weights(path, config)
    else:
        gguf = read_gguf(path)
        config = gguf_loader.read_config(gguf)
        weights = _load_cached(path, cache_dir, config)
        if weights is None:
            weights = gguf_loader.load_weights(gguf, config)
            _store_cached(path, cache_dir, weights)
    check_weights(config, weights, path)
    logger.info(
        "loaded %s (%s, %d tensors) in %.2f s",
        config.model_id,
        config.architecture,
        len(weights),
        time.perf_counter() - start,
    )
    return Checkpoint(config, weights)


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor the model needs, with its shape."""
    h, hd = config.hidden_size, config.head_dim
    q, kv = config.num_heads * hd, config.num_kv_heads * hd
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (config.vocab_size, h),
        "model.norm.weight": (h,),
    }
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, h)
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "self_attn.q_proj.weight": (q, h),
                p + "self_attn.k_proj.weight": (kv, h),
                p + "self_attn.v_proj.weight": (kv, h),
                p + "self_attn.o_proj.weight": (h, q),
                p + "mlp.gate_proj.weight": (config.intermediate_size, h),
                p + "mlp.up_proj.weight": (config.intermediate_size, h),
                p + "mlp.down_proj.weight": (h, config.intermediate_size),
                p + "input_layernorm.weight": (h,),
                p + "post_attention_layernorm.weight": (h,),
            }
        )
        if config.attention_bias:
            shapes.update(
                {
                    p + "self_attn.q_proj.bias": (q,),
                    p + "self_attn.k_proj.bias": (kv,),
                    p + "self_attn.v_proj.bias": (kv,),
                }
            )
    return shapes


def check_weights(config: ModelConfig, weights: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise `ModelLoadError` naming `source` and the tensor if one is missing, extra or misshapen."""
    shapes = expected_shapes(config)
    missing = [name for name in shapes if name not in weights]
    if missing:
        raise ModelLoadError(f"{source}: missing tensor {missing[0]} ({len(missing)} missing)")
    extra = [name for name in weights if name not in shapes]
    if extra:
        raise ModelLoadError(
            f"{source}: unexpected tensor {extra[0]} for {config.architecture} ({len(extra)} unexpected)"
        )
    for name, shape in shapes.items():
        tensor = weights[name]
        if tuple(tensor.shape) != shape:
            raise ModelLoadError(
                f"{source}: tensor {name} has shape {tuple(tensor.shape)}, expected {shape}"
            )
        if tensor.dtype != torch.float32:
            raise ModelLoadError(f"{source}: tensor {name} is {tensor.dtype}, expected float32")


def cache_path(gguf_path: str, cache_dir: str = "") -> str:
    """Where the dequantized weights of `gguf_path` are cached (path + size + mtime key)."""
    return cache_entry(gguf_path, cache_dir, "gguf", _CACHE_FORMAT) + ".safetensors"


def cache_root(cache_dir: str = "") -> str:
    """`cache_dir`, else `TRIDENT_CACHE_DIR`, else `~/.cache/trident`: where the engine keeps
    what it derives (converted weights, compiled CPU kernels)."""
    return cache_dir or os.environ.get("TRIDENT_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "trident")


def cache_entry(source: str, cache_dir: str, kind: str, version: int) -> str:
    """`<cache root>/<kind>/<model id>-<digest>`: the digest keys the entry to `source`'s path,
    size and mtime and to the entry's format `version`. The root is `cache_dir`, else
    `TRIDENT_CACHE_DIR`, else `~/.cache/trident`. Also used by `plugins.vllm.model_dir`."""
    root = cache_root(cache_dir)
    st = os.stat(source)
    key = f"{version}|{os.path.abspath(source)}|{st.st_size}|{st.st_mtime_ns}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return os.path.join(root, kind, f"{model_id_for(source)}-{digest}")


def _load_cached(
    gguf_path: str, cache_dir: str, config: ModelConfig
) -> dict[str, torch.Tensor] | None:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = cache_path(gguf_path, cache_dir)
    if not os.path.isfile(path):
        return None
    try:
        weights = load_file(path)
        check_weights(config, weights, path)
    except (SafetensorError, OSError, ValueError, ModelLoadError) as exc:
        logger.warning("ignoring unreadable weight cache %s (%s); dequantizing again", path, exc)
        _remove(path)
        return None
    logger.info("loaded dequantized weights of %s from cache %s", gguf_path, path)
    return weights


def _store_cached(gguf_path: str, cache_dir: str, weights: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    path = cache_path(gguf_path, cache_dir)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        save_file(weights, tmp, metadata={"source": gguf_path, "format": str(_CACHE_FORMAT)})
        os.replace(tmp, path)  # atomic: a reader sees the old state or the whole file
    except OSError as exc:
        logger.warning(
            "cannot write weight cache %s (%s); the next start dequantizes again", path, exc
        )
        _remove(tmp)
        return
    logger.info("cached dequantized weights at %s", path)
    _remove_stale(path, gguf_path)


def _remove_stale(current: str, gguf_path: str) -> None:
    """Delete caches of earlier versions (other size/mtime) of the same GGUF file."""
    from safetensors import SafetensorError, safe_open

    folder, prefix = os.path.dirname(current), model_id_for(gguf_path) + "-"
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if path == current or not (name.startswith(prefix) and name.endswith(".safetensors")):
            continue
        try:
            with safe_open(path, framework="pt") as f:
                source = (f.metadata() or {}).get("source")
        except (SafetensorError, OSError):
            continue
        if source == gguf_path:
            logger.info("removing stale weight cache %s", path)
            _remove(path)


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass
