"""GGUF -> `ModelConfig` + fp32 weights in Hugging Face names.

Called by `loader.load_checkpoint` only. Dequantization is `gguf.quants.dequantize`, the
same routine transformers' GGUF loader uses, and llama.cpp's q/k row permutation (its
converter reorders rows for its interleaved RoPE) is undone as transformers does, so the
result equals `AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)`'s state dict.
"""

from __future__ import annotations

import logging
import os
import re
import time

import numpy as np
import torch

from plugins.torch_engine.model_config import LLAMA, QWEN2, ModelConfig
from trident.core.errors import ModelLoadError
from trident.core.model_files import GGUFFile, GGUFTensorInfo, gguf_eos_token_ids, model_id_for

logger = logging.getLogger(__name__)

_ARCHITECTURES = {"llama": LLAMA, "qwen2": QWEN2}
_LOG_EVERY = 64  # tensors between progress lines

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_LAYER_RE = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")
_ROPE_FREQS = "rope_freqs.weight"


def read_config(gguf: GGUFFile) -> ModelConfig:
    """The model config from GGUF metadata; an unsupported architecture raises `ModelLoadError`."""
    arch = gguf.architecture
    if arch not in _ARCHITECTURES:
        raise ModelLoadError(
            f"{gguf.path}: GGUF architecture {arch!r} is not supported (supported: {', '.join(_ARCHITECTURES)})"
        )
    meta = gguf.metadata

    def need(key: str) -> object:
        value = gguf.arch_value(key)
        if value is None:
            raise ModelLoadError(f"{gguf.path}: metadata key {arch}.{key} is missing")
        return value

    hidden, heads = int(need("embedding_length")), int(need("attention.head_count"))
    kv_heads = int(gguf.arch_value("attention.head_count_kv", heads))
    names = {t.name for t in gguf.tensors}
    embed = next((t for t in gguf.tensors if t.name == "token_embd.weight"), None)
    vocab = (
        gguf.arch_value("vocab_size")
        or len(meta.get("tokenizer.ggml.tokens") or ())
        or (embed.shape[0] if embed else 0)
    )
    bos = meta.get("tokenizer.ggml.bos_token_id")
    return ModelConfig(
        model_id=model_id_for(gguf.path),
        architecture=_ARCHITECTURES[arch],
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(need("feed_forward_length")),
        num_layers=int(need("block_count")),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=int(gguf.arch_value("attention.key_length", hidden // heads if heads else 0)),
        rms_norm_eps=float(need("attention.layer_norm_rms_epsilon")),
        rope_theta=float(gguf.arch_value("rope.freq_base", 10000.0)),
        rope_scaling=_rope_scaling(gguf),
        max_position_embeddings=int(need("context_length")),
        tie_word_embeddings="output.weight" not in names,
        bos_token_id=bos if isinstance(bos, int) else None,
        eos_token_ids=gguf_eos_token_ids(meta),
    ).validate(gguf.path)


def load_weights(gguf: GGUFFile, config: ModelConfig) -> dict[str, torch.Tensor]:
    """Dequantize every tensor to fp32 and rename it; logs progress every few dozen tensors."""
    start = time.perf_counter()
    data = _open_data(gguf.path)
    weights: dict[str, torch.Tensor] = {}
    total = len(gguf.tensors)
    for done, info in enumerate(gguf.tensors, 1):
        if info.name == _ROPE_FREQS:
            continue  # a config value (see _rope_scaling), not a weight
        name = hf_name(info.name, gguf.path)
        array = _dequantize(data, info, gguf.path)
        if config.architecture == LLAMA and name.endswith(("q_proj.weight", "k_proj.weight")):
            array = _unpermute(array, config.num_heads if "q_proj" in name else config.num_kv_heads)
        array = np.ascontiguousarray(array, dtype=np.float32)
        if np.may_share_memory(array, data):  # F32 tensors are views of the mapped file
            array = array.copy()
        weights[name] = torch.from_numpy(array)
        if done % _LOG_EVERY == 0 or done == total:
            logger.info(
                "dequantizing %s: %d/%d tensors, %.1f s",
                os.path.basename(gguf.path),
                done,
                total,
                time.perf_counter() - start,
            )
    return weights


def hf_name(gguf_name: str, path: str) -> str:
    """Hugging Face name of a GGUF tensor (`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`)."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _LAYER_RE.match(gguf_name)
    if match is None or match.group(2) not in _LAYER_NAMES:
        raise ModelLoadError(
            f"{path}: unexpected tensor {gguf_name} (not a Llama/Qwen2 decoder tensor)"
        )
    layer, part, kind = match.groups()
    return f"model.layers.{layer}.{_LAYER_NAMES[part]}.{kind}"


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's `permute` of q/k rows: per head, (2, half) pairs back to (half, 2) halves."""
    return (
        w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _open_data(path: str) -> np.memmap:
    try:
        return np.memmap(path, dtype=np.uint8, mode="r")
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path}: cannot map file: {exc}") from exc


def _dequantize(data: np.memmap, info: GGUFTensorInfo, path: str) -> np.ndarray:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import dequantize, quant_shape_to_byte_shape

    try:
        qtype = GGMLQuantizationType(info.ggml_type)
        byte_shape = quant_shape_to_byte_shape(info.shape, qtype)
    except (ValueError, KeyError) as exc:
        raise ModelLoadError(
            f"{path}: tensor {info.name} has unsupported type {info.ggml_type}: {exc}"
        ) from exc
    nbytes = int(np.prod(byte_shape))
    if info.offset + nbytes > data.shape[0]:
        raise ModelLoadError(
            f"{path}: tensor {info.name} ends at byte {info.offset + nbytes} but the file has "
            f"{data.shape[0]} bytes (truncated?)"
        )
    raw = data[info.offset : info.offset + nbytes].reshape(byte_shape)
    try:
        return dequantize(raw, qtype)
    except NotImplementedError as exc:
        block, _ = GGML_QUANT_SIZES[qtype]
        raise ModelLoadError(
            f"{path}: tensor {info.name}: cannot dequantize {qtype.name} (block {block}): {exc}"
        ) from exc


def _rope_scaling(gguf: GGUFFile) -> dict[str, object] | None:
    freqs = next((t for t in gguf.tensors if t.name == _ROPE_FREQS), None)
    if freqs is not None:
        factors = _dequantize(_open_data(gguf.path), freqs, gguf.path)
        return {
            "rope_type": "freq_factors",
            "freq_factors": [float(x) for x in factors.reshape(-1)],
        }
    kind = gguf.arch_value("rope.scaling.type")
    if kind in (None, "none"):
        return None
    scaling: dict[str, object] = {
        "rope_type": kind,
        "factor": float(gguf.arch_value("rope.scaling.factor", 1.0)),
    }
    original = gguf.arch_value("rope.scaling.original_context_length")
    if original:
        scaling["original_max_position_embeddings"] = int(original)
    return scaling
