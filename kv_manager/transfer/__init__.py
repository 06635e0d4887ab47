"""KV transfer between worker processes on one node (see ARCHITECTURE.md, "KV transfer").

- `allocate_pool` gives an engine its KV pool: plain memory, POSIX shared memory (CPU) or a
  CUDA-IPC-exportable allocation (GPU).
- `KVExporterImpl` (prefill side) pins blocks under leases and hands out descriptors.
- `KVImporterImpl` (decode side) checks a descriptor, maps the peer pool once, copies blocks
  and releases the lease.

The contract the engines code against is in `kv_manager.transfer.base`.
"""

from __future__ import annotations

from kv_manager.transfer.base import KVDescriptor, KVExporter, KVImporter, KVPoolMemory
from kv_manager.transfer.cuda_pool import CudaPool
from kv_manager.transfer.descriptor import decode_descriptor, encode_descriptor
from kv_manager.transfer.exporter import KVExporterImpl
from kv_manager.transfer.importer import KVImporterImpl
from kv_manager.transfer.lease import EXPIRY_GRACE_S
from kv_manager.transfer.local_pool import LocalPool
from kv_manager.transfer.pool import allocate_pool
from kv_manager.transfer.shm_pool import ShmPool

__all__ = [
    "EXPIRY_GRACE_S",
    "CudaPool",
    "KVDescriptor",
    "KVExporter",
    "KVExporterImpl",
    "KVImporter",
    "KVImporterImpl",
    "KVPoolMemory",
    "LocalPool",
    "ShmPool",
    "allocate_pool",
    "decode_descriptor",
    "encode_descriptor",
]
