"""Paged attention over the engine's KV pool, in plain PyTorch (CPU and CUDA).

The pool has shape `(num_blocks, num_layers, 2, block_size, kv_heads, head_dim)`
(`kv_manager.layout`). The scheduler builds one `AttentionMetadata` per step; every layer
of the model calls `write_kv` then `attend` with it. Decode rows (one query token each) are
attended together: by the engine's CPU kernel reading K/V in place when the runner set
`kernels` (float32 on CPU; the model then writes K/V with them too), else as one padded
batch gathered from the pool. Each prefill chunk is attended on its own with a causal mask
offset by the tokens already in the cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from plugins.torch_engine.kernels import CpuKernels


@dataclass(slots=True)
class PrefillSpan:
    """One sequence's prefill chunk: query rows [start, end) of the flat batch."""

    start: int
    end: int
    context_len: int  # tokens in the cache after this chunk (cached + chunk)
    block_table: torch.Tensor  # [num_blocks_of_seq] long


@dataclass(slots=True)
class AttentionMetadata:
    """Built once per step by the engine; read by every layer."""

    slot_blocks: torch.Tensor  # [T] block id of each new token
    slot_offsets: torch.Tensor  # [T] offset of each new token inside its block
    num_decode: int  # the first num_decode rows are decode tokens
    decode_block_tables: torch.Tensor | None  # [D, max_blocks] long (padded with 0)
    decode_lens: torch.Tensor | None  # [D] int32: tokens in the cache, this step's included
    decode_mask: torch.Tensor | None  # [D, 1, 1, max_blocks*block_size] bool (PyTorch path only)
    prefills: list[PrefillSpan]
    kernels: CpuKernels | None = None  # set: decode attention runs on the CPU kernel


def write_kv(pool: torch.Tensor, layer: int, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> None:
    """Store this step's keys/values ([T, kv_heads, head_dim]) into their slots."""
    pool[meta.slot_blocks, layer, 0, meta.slot_offsets] = k
    pool[meta.slot_blocks, layer, 1, meta.slot_offsets] = v


def attend(pool: torch.Tensor, layer: int, q: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """Attention output [T, heads, head_dim] for queries q [T, heads, head_dim]."""
    d = meta.num_decode
    if d and d == q.shape[0]:
        return _decode_attention(pool, layer, q, meta, scale)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if d:
        out[:d] = _decode_attention(pool, layer, q[:d], meta, scale)
    for span in meta.prefills:
        out[span.start : span.end] = _prefill_attention(pool, layer, q[span.start : span.end], span, scale)
    return out


def _gather(pool: torch.Tensor, layer: int, block_table: torch.Tensor, kv: int) -> torch.Tensor:
    # [..., nb] -> [..., nb * block_size, kv_heads, head_dim]
    # Basic indexing first (a view), then one index_select over the block dimension: much
    # cheaper than advanced indexing across the whole pool.
    blocks = pool[:, layer, kv].index_select(0, block_table.reshape(-1))
    bs, heads, dim = blocks.shape[1:]
    return blocks.view(*block_table.shape[:-1], block_table.shape[-1] * bs, heads, dim)


def _decode_attention(pool: torch.Tensor, layer: int, q: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    assert meta.decode_block_tables is not None and meta.decode_lens is not None
    if meta.kernels is not None:
        return meta.kernels.decode_attention(q, pool[:, layer], meta.decode_block_tables, meta.decode_lens, scale)
    assert meta.decode_mask is not None
    # One query per row: float32 SDPA is faster on CPU than its bf16 kernel at this shape
    # (and more precise); the gathered K/V are a fresh copy anyway.
    k = _gather(pool, layer, meta.decode_block_tables, 0).transpose(1, 2).float()  # [D, kvh, S, hd]
    v = _gather(pool, layer, meta.decode_block_tables, 1).transpose(1, 2).float()
    out = F.scaled_dot_product_attention(
        q.unsqueeze(2).float(), k, v, attn_mask=meta.decode_mask, scale=scale, enable_gqa=True
    )  # [D, heads, 1, hd]
    return out.squeeze(2).to(q.dtype)


def _prefill_attention(pool: torch.Tensor, layer: int, q: torch.Tensor, span: PrefillSpan, scale: float) -> torch.Tensor:
    n, ctx = q.shape[0], span.context_len
    k = _gather(pool, layer, span.block_table, 0)[:ctx].transpose(0, 1)  # [kvh, ctx, hd]
    v = _gather(pool, layer, span.block_table, 1)[:ctx].transpose(0, 1)
    qh = q.transpose(0, 1)  # [heads, n, hd]
    if ctx == n:
        out = F.scaled_dot_product_attention(qh, k, v, is_causal=True, scale=scale, enable_gqa=True)
    else:
        # Query i sits at position ctx - n + i and sees keys 0..ctx - n + i.
        rows = torch.arange(ctx - n, ctx, device=q.device).unsqueeze(1)
        cols = torch.arange(ctx, device=q.device).unsqueeze(0)
        out = F.scaled_dot_product_attention(qh, k, v, attn_mask=cols <= rows, scale=scale, enable_gqa=True)
    return out.transpose(0, 1)
