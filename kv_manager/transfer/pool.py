"""`allocate_pool`: the one way an engine gets its KV pool memory (see `base.py`)."""

from __future__ import annotations

import torch

from kv_manager.layout import KVLayout
from kv_manager.transfer.base import KVPoolMemory
from kv_manager.transfer.cuda_pool import CudaPool
from kv_manager.transfer.local_pool import LocalPool
from kv_manager.transfer.shm_pool import ShmPool
from trident.core.errors import ConfigError


def allocate_pool(
    layout: KVLayout, num_blocks: int, device: str | torch.device, shareable: bool
) -> KVPoolMemory:
    """Allocate a zeroed pool of `layout.pool_shape(num_blocks)` on `device`.

    shareable=False: plain `torch.zeros` on the device (only this process maps it).
    shareable=True: POSIX shared memory on CPU, a CUDA-IPC-exportable allocation on GPU.
    The caller owns the pool and must `close()` it.
    """
    if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks <= 0:
        raise ConfigError(f"num_blocks: must be a positive int, got {num_blocks!r}")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"device: not a torch device: {device!r}") from e
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"device: KV pools live on cpu or cuda, got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: {device!r} requested but this process has no CUDA device")
    if not shareable:
        return LocalPool(layout, num_blocks, dev)
    if dev.type == "cpu":
        return ShmPool(layout, num_blocks)
    return CudaPool(layout, num_blocks, dev)
