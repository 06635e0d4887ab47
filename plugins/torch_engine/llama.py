"""Llama-family decoder (Llama 2/3, SmolLM2, Mistral, Qwen2) over a paged KV pool.

RMSNorm, rotary embeddings (theta and Llama-3 scaling from the checkpoint), grouped-query
attention, SwiGLU, tied or untied embeddings, optional q/k/v biases (Qwen2). Weights come
from `plugins.torch_engine.loader` in Hugging Face names; q/k/v and gate/up are fused into
one matmul each. The engine calls `forward` once per step with the flat batch of new tokens
and `compute_logits` on the rows it samples; the model never owns the KV pool.

On CPU in float32 the projections and the LM head run on the engine's own packed GEMM
(`plugins.torch_engine.kernels`), their weights stored once in its panel layout (the LM
head's beside the embedding table it may be tied to), and RMSNorm and SwiGLU on its
kernels too; RoPE with the KV writes does when the runner hands the kernels to attention
(`AttentionMetadata.kernels`). Elsewhere, or with `cpu_kernels` off, and where the kernels
cannot be built, it is all PyTorch ops.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from plugins.torch_engine import kernels as cpu_kernels
from plugins.torch_engine.attention import AttentionMetadata, attend, write_kv
from plugins.torch_engine.kernels import CpuKernels, DecodeLayers, PackedWeight
from trident.core.errors import ModelLoadError

Weight = torch.Tensor | PackedWeight  # a projection: F.linear's [out, in] or packed panels


class LlamaModel:
    """Holds the weights; stateless between steps (the KV lives in the engine's pool)."""

    def __init__(
        self,
        config: Any,
        weights: dict[str, torch.Tensor],
        dtype: torch.dtype,
        device: torch.device,
        max_positions: int,
        use_cpu_kernels: bool = True,
        cache_dir: str = "",
    ) -> None:
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
        # Set when the weights are packed for them; the runner also uses them for attention.
        self.kernels: CpuKernels | None = None
        if use_cpu_kernels and device.type == "cpu" and dtype == torch.float32:
            self.kernels = cpu_kernels.load(cache_dir)
        self._load(weights)
        # Decode-only steps run every layer in one call when the runner hands the kernels to
        # attention (the pool is theirs to read and write).
        self.decode_layers: DecodeLayers | None = None
        if self.kernels is not None:
            self.decode_layers = DecodeLayers.make(self.kernels, self.layers, self.eps, self.num_heads,
                                                   self.num_kv_heads, self.head_dim)
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
        lm_head = self.embed if "lm_head.weight" not in w else take("lm_head.weight")
        k = self.kernels
        self.lm_head: Weight = lm_head if k is None else k.pack(lm_head)

        def proj(weight: torch.Tensor, bias: torch.Tensor | None = None) -> tuple[Weight, torch.Tensor | None]:
            return (weight, bias) if k is None else (k.pack(weight, bias), None)

        self.layers = []
        for i in range(self.config.num_layers):
            p = f"model.layers.{i}."
            qkv_bias = None
            if p + "self_attn.q_proj.bias" in w:
                qkv_bias = torch.cat([take(p + f"self_attn.{n}_proj.bias") for n in "qkv"])
            qkv, qkv_bias = proj(torch.cat([take(p + f"self_attn.{n}_proj.weight") for n in "qkv"]), qkv_bias)
            o, o_bias = proj(take(p + "self_attn.o_proj.weight"), maybe(p + "self_attn.o_proj.bias"))
            self.layers.append(
                _Layer(
                    attn_norm=take(p + "input_layernorm.weight"),
                    qkv=qkv,
                    qkv_bias=qkv_bias,
                    o=o,
                    o_bias=o_bias,
                    mlp_norm=take(p + "post_attention_layernorm.weight"),
                    gate_up=proj(torch.cat([take(p + "mlp.gate_proj.weight"), take(p + "mlp.up_proj.weight")]))[0],
                    down=proj(take(p + "mlp.down_proj.weight"))[0],
                )
            )

    def weight_bytes(self) -> int:
        """Bytes of weights read by one decode step (the roofline numerator): every layer's,
        the final norm and the LM head (the embedding table is read one row per token)."""
        total = _nbytes(self.norm) + _nbytes(self.lm_head)
        for layer in self.layers:
            total += sum(_nbytes(t) for t in layer.tensors())
        return total

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, pool: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        h = F.embedding(input_ids, self.embed)  # a fresh tensor: the residual stream, added to in place
        cos = self.cos[positions].to(self.dtype)
        sin = self.sin[positions].to(self.dtype)
        t = input_ids.shape[0]
        if self.decode_layers is not None and meta.kernels is not None and meta.num_decode == t:
            assert meta.decode_block_tables is not None and meta.decode_lens is not None
            self.decode_layers(h, cos, sin, pool, meta.slot_blocks, meta.slot_offsets, meta.decode_block_tables,
                               meta.decode_lens, self.scale)
            return self._norm(h, self.norm)
        for i, layer in enumerate(self.layers):
            x = self._norm(h, layer.attn_norm)
            q = self._rope_store(linear(x, layer.qkv, layer.qkv_bias), cos, sin, pool, i, meta)
            add_linear(h, attend(pool, i, q, meta, self.scale).reshape(t, self.q_size), layer.o, layer.o_bias)
            x = self._norm(h, layer.mlp_norm)
            add_linear(h, self._swiglu(linear(x, layer.gate_up)), layer.down)
        return self._norm(h, self.norm)

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return linear(hidden, self.lm_head).float()

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        k = self.kernels
        return rms_norm(x, weight, self.eps) if k is None else k.rms_norm(x, weight, self.eps)

    def _swiglu(self, gate_up: torch.Tensor) -> torch.Tensor:
        if self.kernels is not None:
            return self.kernels.silu_mul(gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    def _rope_store(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pool: torch.Tensor, layer: int,
                    meta: AttentionMetadata) -> torch.Tensor:
        """Rotary embeddings on the fused q/k/v rows; this step's keys and values go into the
        pool. Returns the rotated queries [T, heads, head_dim]."""
        t, heads, kv_heads, dim = qkv.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        if meta.kernels is not None:  # the runner found the pool readable by the kernels
            meta.kernels.rope_store(qkv, cos, sin, heads, kv_heads, pool[:, layer], meta.slot_blocks, meta.slot_offsets)
            return qkv[:, : self.q_size].view(t, heads, dim)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = apply_rope(q.view(t, heads, dim), cos, sin)
        write_kv(pool, layer, apply_rope(k.view(t, kv_heads, dim), cos, sin), v.view(t, kv_heads, dim), meta)
        return q


def linear(x: torch.Tensor, w: Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`x @ w.T + bias`; a packed weight carries its own bias."""
    return w(x) if isinstance(w, PackedWeight) else F.linear(x, w, bias)


def add_linear(h: torch.Tensor, x: torch.Tensor, w: Weight, bias: torch.Tensor | None = None) -> None:
    """`h += x @ w.T + bias` in place (the residual add; the packed GEMM accumulates into h)."""
    if isinstance(w, PackedWeight):
        w.add_to(h, x)
    else:
        h += F.linear(x, w, bias)


def _nbytes(t: Weight) -> int:
    return t.nbytes() if isinstance(t, PackedWeight) else t.numel() * t.element_size()


class _Layer:
    __slots__ = ("attn_norm", "qkv", "qkv_bias", "o", "o_bias", "mlp_norm", "gate_up", "down")

    def __init__(self, **tensors: torch.Tensor | None) -> None:
        for name, value in tensors.items():
            setattr(self, name, value)

    def tensors(self) -> list[Weight]:
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
