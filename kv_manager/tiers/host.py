"""Host-memory KV tier: an arena of block slots, least recently used evicted first.

The arena is one tensor of `(num_slots, *layout.block_shape)` in ordinary host memory (a
CUDA engine pins it, so copies to and from the device run asynchronously). The tier owns
the arena and every slot; callers copy whole blocks in and out through `write` and `read`.
A slot is free, reserved by a store job, held (visible, evictable when not pinned), or
pinned by load jobs. Eviction takes the least recently stored or loaded unpinned block and
records `BlockRemoved`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kv_manager.events import BlockRemoved, BlockStored
from kv_manager.layout import KVLayout
from kv_manager.tiers.base import BlockKey, IndexedTier, LoadJob, StoreJob, TierError
from kv_manager.transfer.local_pool import torch_dtype

MEDIUM = "CPU"


class HostTier(IndexedTier):
    """See the module docstring and `kv_manager.tiers.base`."""

    medium = MEDIUM

    def __init__(self, layout: KVLayout, num_slots: int, *, pin_memory: bool = False) -> None:
        super().__init__()
        if num_slots <= 0:
            raise TierError(f"host tier: num_slots must be positive, got {num_slots}")
        self.layout = layout
        self.arena = torch.empty((num_slots, *layout.block_shape), dtype=torch_dtype(layout), pin_memory=pin_memory)
        self._free = list(range(num_slots - 1, -1, -1))

    # -- store ---------------------------------------------------------------------------
    def prepare_store(self, keys: Sequence[BlockKey]) -> StoreJob:
        with self._lock:
            job = StoreJob([k for k in keys if k.block_hash not in self._index])
            for _ in job.keys:
                slot = self._take_slot()
                if slot is None:  # everything held is pinned: store what fits
                    job.keys = job.keys[: len(job.slots)]
                    break
                job.slots.append(slot)
            return job

    def write(self, job: StoreJob, i: int, block: torch.Tensor) -> None:
        self.arena[job.slots[i]].copy_(block, non_blocking=block.is_cuda)

    def complete_store(self, job: StoreJob, ok: bool) -> None:
        if job.done:
            return
        job.done = True
        with self._lock:
            if not ok:
                self._free.extend(job.slots)
                return
            for key, slot in zip(job.keys, job.slots, strict=True):
                self._index[key.block_hash] = slot
            self.stats["stored"] += len(job.keys)
            self._events.extend(stored_events(job.keys, self.layout.block_size, MEDIUM))

    # -- load ----------------------------------------------------------------------------
    def read(self, job: LoadJob, i: int, out: torch.Tensor) -> None:
        out.copy_(self.arena[job.slots[i]], non_blocking=out.is_cuda)


    # -- eviction, events ----------------------------------------------------------------
    def _take_slot(self) -> int | None:
        if self._free:
            return self._free.pop()
        for h in self._index:  # least recent first
            if h not in self._pins:
                slot = self._index.pop(h)
                self.stats["evicted"] += 1
                self._events.append(BlockRemoved((h,), MEDIUM))
                return slot
        return None



def stored_events(keys: Sequence[BlockKey], block_size: int, medium: str) -> list[BlockStored]:
    """`BlockStored` events for `keys`, one per run of keys that chain (each the parent of
    the next), since an event's blocks must follow one another."""
    events: list[BlockStored] = []
    run: list[BlockKey] = []
    for key in [*keys, None]:
        if run and (key is None or key.parent_hash != run[-1].block_hash):
            events.append(BlockStored(
                block_hashes=tuple(k.block_hash for k in run), parent_block_hash=run[0].parent_hash,
                token_ids=tuple(t for k in run for t in k.token_ids), block_size=block_size, medium=medium,
            ))
            run = []
        if key is not None:
            run.append(key)
    return events
