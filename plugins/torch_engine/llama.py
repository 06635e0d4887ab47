"""Llama-family decoder (Llama 2/3, SmolLM2, Mistral, Qwen2) over a paged KV pool.

RMSNorm, rotary embeddings (theta and Llama-3 scaling from the checkpoint), grouped-query
attention, SwiGLU, tied or untied embeddings, optional q/k/v biases (Qwen2). Weights come
from `plugins.torch_engine.loader` in Hugging Face names; q/k/v and gate/up are fused into
one matmul each. The engine calls `forward` once per step with the flat batch of new tokens
and `compute_logits` on the rows it samples; the model never owns the KV pool.

On CPU in float32 the projection weights are stored transposed, [in, out], and multiplied
as `x @ w`: with one or two rows (decode at batch 1-2) MKL's kernel for that layout streams
the weights ~1.3x faster than `F.linear`'s over [out, in], and it is as fast from 8 rows up
and for prefill chunks (one thread, AVX2). The LM head keeps both layouts (its [vocab,
hidden] one is the embedding table): [hidden, vocab] for up to `_LM_HEAD_ROWS_T` rows, else
`(w @ x.T).T` over [vocab, hidden], the faster form from 3 rows up. Other dtypes and devices
keep `F.linear`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from plugins.torch_engine.attention import AttentionMetadata, attend, write_kv
from trident.core.errors import ModelLoadError

_LM_HEAD_ROWS_T = 2  # CPU: up to this many rows, the LM head multiplies [hidden, vocab]


class LlamaModel:
    """Holds the weights; stateless between steps (the KV lives in the engine's pool)."""

    def __init__(self, config: Any, weights: dict[str, torch.Tensor], dtype: torch.dtype, device: torch.device, max_positions: int) -> None:
        self.config = config
        self.dtype = dtype
        self.device = device
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.eps = config.rms_norm_eps
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self._load(weights)
        cos, sin = rope_cache(config, max_positions, device)
        self.cos = cos
        self.sin = sin

    def _load(self, w: dict[str, torch.Tensor]) -> None:
        def take(name: str) -> torch.Tensor:
            if name not in w:
                raise ModelLoadError(f"checkpoint has no tensor {name!r}")
            return w[name].to(device=self.device, dtype=self.dtype).contiguous()

        def maybe(name: str) -> torch.Tensor | None:
            return take(name) if name in w else None

        self.embed = take("model.embed_tokens.weight")
        self.norm = take("model.norm.weight")
        self.lm_head = self.embed if "lm_head.weight" not in w else take("lm_head.weight")
        # CPU: [in, out] projections (see the module docstring); the [hidden, vocab] head too
        self.transposed = self.device.type == "cpu" and self.dtype == torch.float32
        self.lm_head_t = self.lm_head.t().contiguous() if self.transposed else None
        proj = (lambda t: t.t().contiguous()) if self.transposed else (lambda t: t)
        self.layers = []
        for i in range(self.config.num_layers):
            p = f"model.layers.{i}."
            qkv_bias = None
            if p + "self_attn.q_proj.bias" in w:
                qkv_bias = torch.cat([take(p + f"self_attn.{n}_proj.bias") for n in "qkv"])
            self.layers.append(
                _Layer(
                    attn_norm=take(p + "input_layernorm.weight"),
                    qkv=proj(torch.cat([take(p + f"self_attn.{n}_proj.weight") for n in "qkv"])),
                    qkv_bias=qkv_bias,
                    o=proj(take(p + "self_attn.o_proj.weight")),
                    o_bias=maybe(p + "self_attn.o_proj.bias"),
                    mlp_norm=take(p + "post_attention_layernorm.weight"),
                    gate_up=proj(torch.cat([take(p + "mlp.gate_proj.weight"), take(p + "mlp.up_proj.weight")])),
                    down=proj(take(p + "mlp.down_proj.weight")),
                )
            )

    def linear(self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """`x @ W.T + bias` for a projection weight as this model stores it."""
        if not self.transposed:
            return F.linear(x, w, bias)
        return torch.addmm(bias, x, w) if bias is not None else x @ w

    def weight_bytes(self) -> int:
        """Bytes of weights read by one decode step (the roofline numerator)."""
        tensors = [self.embed, self.norm] + ([] if self.lm_head is self.embed else [self.lm_head])
        total = sum(t.numel() * t.element_size() for t in tensors)
        for layer in self.layers:
            total += sum(t.numel() * t.element_size() for t in layer.tensors())
        return total

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, pool: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        h = F.embedding(input_ids, self.embed)
        cos = self.cos[positions].to(self.dtype)
        sin = self.sin[positions].to(self.dtype)
        t = input_ids.shape[0]
        for i, layer in enumerate(self.layers):
            x = rms_norm(h, layer.attn_norm, self.eps)
            qkv = self.linear(x, layer.qkv, layer.qkv_bias)
            q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
            q = apply_rope(q.view(t, self.num_heads, self.head_dim), cos, sin)
            k = apply_rope(k.view(t, self.num_kv_heads, self.head_dim), cos, sin)
            write_kv(pool, i, k, v.view(t, self.num_kv_heads, self.head_dim), meta)
            a = attend(pool, i, q, meta, self.scale)
            h = h + self.linear(a.reshape(t, self.q_size), layer.o, layer.o_bias)
            x = rms_norm(h, layer.mlp_norm, self.eps)
            gate, up = self.linear(x, layer.gate_up).chunk(2, dim=-1)
            h = h + self.linear(F.silu(gate) * up, layer.down)
        return rms_norm(h, self.norm, self.eps)

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.lm_head_t is not None and hidden.shape[0] <= _LM_HEAD_ROWS_T:
            return (hidden @ self.lm_head_t).float()
        if self.transposed:
            return (self.lm_head @ hidden.t()).t().contiguous()
        return F.linear(hidden, self.lm_head).float()


class _Layer:
    __slots__ = ("attn_norm", "qkv", "qkv_bias", "o", "o_bias", "mlp_norm", "gate_up", "down")

    def __init__(self, **tensors: torch.Tensor | None) -> None:
        for name, value in tensors.items():
            setattr(self, name, value)

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (getattr(self, n) for n in self.__slots__) if t is not None]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # In float32 like Hugging Face's LlamaRMSNorm, then back to the model dtype.
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE; x [T, heads, head_dim], cos/sin [T, head_dim]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos.unsqueeze(1) + rotated * sin.unsqueeze(1)


def rope_cache(config: Any, max_positions: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [max_positions, head_dim] in float32."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "llama3":
        inv_freq = _llama3_scaling(inv_freq, scaling)
    elif kind == "freq_factors":  # Llama 3.1+ GGUF files carry the scaled factors as a tensor
        inv_freq = inv_freq / torch.tensor(scaling["freq_factors"], dtype=torch.float32)
    elif kind == "linear":
        inv_freq = inv_freq / float(scaling["factor"])
    elif kind not in (None, "default"):
        raise ModelLoadError(f"unsupported rope_scaling type {kind!r}")
    pos = torch.arange(max_positions, dtype=torch.int64).float()
    freqs = pos[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(device), emb.sin().to(device)


def _llama3_scaling(inv_freq: torch.Tensor, s: dict) -> torch.Tensor:
    factor = float(s["factor"])
    low = float(s.get("low_freq_factor", 1.0))
    high = float(s.get("high_freq_factor", 4.0))
    old_len = float(s.get("original_max_position_embeddings", 8192))
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, smoothed, scaled)
