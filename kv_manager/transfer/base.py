"""The contract between an engine and the KV transfer layer.

Who calls what (on the engine's loop thread, except the importer, noted below):

- Every engine allocates its KV pool with `allocate_pool(layout, num_blocks, device,
  shareable)`; with `shareable=True` the memory can be mapped by another process (POSIX
  shared memory on CPU, a CUDA allocation exportable by IPC handle on GPU). The engine owns
  the returned `KVPoolMemory` and calls `close()` at shutdown.
- A prefill engine, when a `hold_kv` request finishes, calls `KVExporter.export(...)`: the
  request's prompt blocks stay pinned under a lease and the returned descriptor (bytes)
  travels to a decode worker through the router. Each step the engine calls
  `poll_released()` and frees the blocks of leases that were released or have expired.
- A decode engine, when it admits a request with a `kv_descriptor`, allocates its own blocks
  and starts a load (`kv_manager.kv_cache_manager`); its loader thread (one thread, so the
  importer is never used by two at once) calls `KVImporter.open()` (parses, checks the
  layout fingerprint, maps the peer pool once per peer), `pull()`s into the blocks and
  `release()`s the lease, while the loop thread keeps stepping the running batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from kv_manager.layout import KVLayout


class KVPoolMemory(Protocol):
    """A KV pool tensor of shape `layout.pool_shape(num_blocks)` and how peers reach it."""

    tensor: torch.Tensor
    layout: KVLayout
    num_blocks: int

    def handle(self) -> bytes:
        """Opaque bytes a peer process passes to the importer to map this pool."""
        ...

    def close(self) -> None:
        """Release the memory (unlink shared memory). Idempotent."""
        ...


@dataclass(frozen=True, slots=True)
class KVDescriptor:
    """What a prefill worker hands a decode worker: where the prompt's KV lives."""

    worker_id: str
    pool_handle: bytes
    fingerprint: str
    block_ids: tuple[int, ...]
    num_tokens: int
    block_hashes: tuple[int, ...]
    lease_id: str
    lease_expiry: float  # time.time() seconds
    release_addr: str  # where the decode side tells the prefill side it is done


class KVExporter(Protocol):
    def export(
        self, request_id: str, block_ids: list[int], num_tokens: int, block_hashes: list[int]
    ) -> bytes: ...

    def poll_released(self) -> list[list[int]]: ...

    def held_blocks(self) -> int: ...

    def num_leases(self) -> int: ...

    def revoke(self, request_id: str) -> list[list[int]]: ...

    def close(self) -> None: ...


class KVImporter(Protocol):
    def open(self, descriptor: bytes) -> KVDescriptor: ...

    def pull(self, desc: KVDescriptor, dst_pool: torch.Tensor, dst_block_ids: list[int]) -> None: ...

    def release(self, desc: KVDescriptor) -> None: ...

    def close(self) -> None: ...
