"""Pools that no other process maps, and the per-process registry of every pool.

The registry lets a `KVImporter` reach a pool that lives in its own process (a test, or a
prefill and a decode engine sharing one process) without going through shared memory or
CUDA IPC — a CUDA process cannot open its own IPC handle.
"""

from __future__ import annotations

import os
import secrets
import weakref

import torch

from kv_manager.layout import KVLayout
from kv_manager.transfer.handle import PoolHandle, encode_handle

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

_REGISTRY: weakref.WeakValueDictionary[str, object] = weakref.WeakValueDictionary()


def torch_dtype(layout: KVLayout) -> torch.dtype:
    return TORCH_DTYPES[layout.dtype]


def register_local(pool_id: str, pool: object) -> None:
    _REGISTRY[pool_id] = pool


def lookup_local(pool_id: str) -> torch.Tensor | None:
    """The tensor of a live pool of this process, or None."""
    pool = _REGISTRY.get(pool_id)
    tensor = getattr(pool, "tensor", None)
    if tensor is None or getattr(pool, "closed", False):
        return None
    return tensor


class LocalPool:
    """A KV pool in ordinary memory (`torch.zeros` on the device); only this process maps it.

    Built by `allocate_pool(..., shareable=False)`; the engine owns it and its blocks and
    calls `close()` at shutdown. `handle()` works, but only an importer in the same process
    can open it; another process gets a `KVTransferError` saying the pool is not shareable.
    """

    def __init__(self, layout: KVLayout, num_blocks: int, device: torch.device) -> None:
        self.layout = layout
        self.num_blocks = num_blocks
        self.tensor = torch.zeros(
            layout.pool_shape(num_blocks), dtype=torch_dtype(layout), device=device
        )
        self.pool_id = secrets.token_hex(16)
        self.closed = False
        self._handle = encode_handle(
            PoolHandle("local", self.pool_id, os.getpid(), layout, num_blocks)
        )
        register_local(self.pool_id, self)

    def handle(self) -> bytes:
        return self._handle

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.tensor = torch.empty((0, *self.layout.block_shape), dtype=torch_dtype(self.layout))

    def __repr__(self) -> str:
        return f"LocalPool({self.layout.describe()}, num_blocks={self.num_blocks}, device={self.tensor.device})"
