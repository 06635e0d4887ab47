"""The KV pool layout every worker shares, and its fingerprint.

A worker's KV pool is one contiguous tensor of shape
`(num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim)`: one block holds the keys
and values of all layers for `block_size` tokens contiguously, so moving N blocks between
processes is N contiguous copies of `block_nbytes` each. Engines own the pool; the transfer
layer (`kv_manager.transfer`) maps a peer's pool and copies whole blocks.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

DTYPE_SIZES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True, slots=True)
class KVLayout:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: str  # "float32" | "bfloat16" | "float16"
    model_id: str

    @property
    def block_shape(self) -> tuple[int, int, int, int, int]:
        return (self.num_layers, 2, self.block_size, self.num_kv_heads, self.head_dim)

    @property
    def block_numel(self) -> int:
        n = 1
        for d in self.block_shape:
            n *= d
        return n

    @property
    def block_nbytes(self) -> int:
        return self.block_numel * DTYPE_SIZES[self.dtype]

    def pool_shape(self, num_blocks: int) -> tuple[int, ...]:
        return (num_blocks, *self.block_shape)

    def fingerprint(self) -> str:
        """A short digest that two pools must share before blocks move between them."""
        key = (
            f"{self.model_id}|L{self.num_layers}|H{self.num_kv_heads}|D{self.head_dim}"
            f"|B{self.block_size}|{self.dtype}"
        )
        return hashlib.sha256(key.encode()).hexdigest()[:16]

    def describe(self) -> str:
        return (
            f"model={self.model_id} layers={self.num_layers} kv_heads={self.num_kv_heads} "
            f"head_dim={self.head_dim} block_size={self.block_size} dtype={self.dtype}"
        )
