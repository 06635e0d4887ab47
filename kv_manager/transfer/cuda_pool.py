"""A GPU KV pool that other processes map through CUDA IPC.

The pool is one `torch.zeros` allocation on the device; `handle()` asks torch for the IPC
handle of its storage (`UntypedStorage._share_cuda_()`, what `torch.multiprocessing` uses)
once and caches the bytes, so every descriptor of this pool carries the same handle and the
importer opens it once. The handle carries the GPU's UUID rather than its index: two Triton
model instances can see the same GPU under different indices.

Importing this module never touches CUDA, so it is safe on a CPU-only machine.
"""

from __future__ import annotations

import logging
import os
import secrets

import torch

from kv_manager.layout import KVLayout
from kv_manager.transfer.handle import PoolHandle, encode_handle
from kv_manager.transfer.local_pool import register_local, torch_dtype
from trident.core.errors import KVTransferError

log = logging.getLogger(__name__)


class CudaPool:
    """A shareable GPU KV pool.

    Built by `allocate_pool(..., device="cuda:N", shareable=True)`; the engine owns the pool
    and its blocks and calls `close()` at shutdown (idempotent). Peers open it with
    `handle()` through `KVImporter`. Torch's IPC reference counting keeps the memory alive
    while a peer still has it open, even after `close()`.
    """

    def __init__(self, layout: KVLayout, num_blocks: int, device: torch.device) -> None:
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.layout = layout
        self.num_blocks = num_blocks
        self.device = device
        self.pool_id = secrets.token_hex(16)
        self.closed = False
        self.tensor = torch.zeros(
            layout.pool_shape(num_blocks), dtype=torch_dtype(layout), device=device
        )
        self._handle: bytes | None = None
        register_local(self.pool_id, self)

    def handle(self) -> bytes:
        if self.closed:
            raise KVTransferError("the KV pool is closed")
        if self._handle is None:
            ipc = self.tensor.untyped_storage()._share_cuda_()
            self._handle = encode_handle(
                PoolHandle(
                    "cuda",
                    self.pool_id,
                    os.getpid(),
                    self.layout,
                    self.num_blocks,
                    device_uuid=device_uuid(self.device.index),
                    cuda_ipc=tuple(ipc),
                )
            )
        return self._handle

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.tensor = torch.empty((0, *self.layout.block_shape), dtype=torch_dtype(self.layout))

    def __repr__(self) -> str:
        return f"CudaPool({self.layout.describe()}, num_blocks={self.num_blocks}, device={self.device})"


def device_uuid(index: int) -> str:
    return str(torch.cuda.get_device_properties(index).uuid)


def open_cuda(handle: PoolHandle) -> torch.Tensor:
    """Open a peer's GPU pool by IPC; returns a tensor of `layout.pool_shape(num_blocks)`.

    The mapping lives as long as the returned tensor (the importer caches it per peer).
    """
    if not torch.cuda.is_available():
        raise KVTransferError(
            f"peer KV pool {handle.pool_id} is on a GPU, but this process has no CUDA device"
        )
    index = _local_index(handle.device_uuid)
    (_, ipc_handle, size, offset, rc_handle, rc_offset, event_handle, event_sync) = handle.cuda_ipc
    if size < handle.nbytes:
        raise KVTransferError(f"peer KV pool {handle.pool_id}: IPC storage smaller than the pool")
    try:
        storage = torch.UntypedStorage._new_shared_cuda(
            index, ipc_handle, size, offset, rc_handle, rc_offset, event_handle, event_sync
        )
    except RuntimeError as e:
        raise KVTransferError(
            f"cannot open the CUDA IPC handle of peer KV pool {handle.pool_id} (pid {handle.pid}): {e}"
        ) from e
    tensor = torch.empty(0, dtype=torch_dtype(handle.layout), device=torch.device("cuda", index))
    return tensor.set_(storage, 0, handle.layout.pool_shape(handle.num_blocks))


def _local_index(uuid: str) -> int:
    for i in range(torch.cuda.device_count()):
        if device_uuid(i) == uuid:
            return i
    raise KVTransferError(
        f"the peer's KV pool is on GPU {uuid}, which this process cannot see "
        "(check CUDA_VISIBLE_DEVICES of both workers)"
    )
