"""The contract every KV tier keeps, after vLLM's offloading API: two phases each way.

Store: `prepare_store(keys)` reserves room for the keys the tier does not hold yet and
returns a `StoreJob` naming them (the rest are already there); the caller copies each one in
(`write(job, i, block)`), from any one thread, and then calls `complete_store(job, ok)`. Only
then do the blocks become visible to `lookup` and `prepare_load`, and a `BlockStored` event
is recorded; with `ok=False` (or an exception in `write`) the reservation is dropped and
nothing of the job is ever visible.

Load: `lookup(hashes)` counts the leading hashes the tier holds; `prepare_load(hashes)` pins
them (no eviction until `complete_load`) and returns a `LoadJob`; `read(job, i, out)` copies
block i into `out`, raising `TierError` if it cannot (a corrupt file: the tier drops it); the
caller then recomputes from that block on.

A tier is used by one engine's `TieredCache` (`kv_manager.tiers.cache`): the loop thread looks
up and prepares loads, the cache's offload and onboard threads prepare stores, write, read and
complete; a lock inside each tier keeps the index consistent between them.
`take_events()` drains the tier's events (medium "CPU" or "DISK") for the worker's publisher.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Container, MutableMapping, Sequence
from dataclasses import dataclass, field

from kv_manager.events import KVEvent
from trident.core.errors import TridentError


class TierError(TridentError):
    """A tier could not store or load a block (full, corrupt, gone)."""


@dataclass(frozen=True, slots=True)
class BlockKey:
    """A full block: its chained hash, its parent's, and its tokens (for events)."""

    block_hash: int
    parent_hash: int | None
    token_ids: tuple[int, ...]


@dataclass(slots=True)
class StoreJob:
    keys: list[BlockKey]  # the blocks to write, in order; blocks already held are left out
    slots: list[object] = field(default_factory=list)  # the tier's reservation for each
    done: bool = False


@dataclass(slots=True)
class LoadJob:
    hashes: list[int]
    slots: list[object] = field(default_factory=list)
    done: bool = False


def leading_hits(held: Container[int], hashes: Sequence[int]) -> int:
    """How many of `hashes`, from the first, are in `held`."""
    n = 0
    for h in hashes:
        if h not in held:
            break
        n += 1
    return n


def pin(pins: MutableMapping[int, int], hashes: Sequence[int]) -> None:
    for h in hashes:
        pins[h] = pins.get(h, 0) + 1


def unpin(pins: MutableMapping[int, int], hashes: Sequence[int]) -> None:
    for h in hashes:
        left = pins.get(h, 1) - 1
        if left:
            pins[h] = left
        else:
            pins.pop(h, None)


class IndexedTier:
    """What both tiers share: the index of held blocks (hash -> the tier's record of it,
    least recently used first), load pins, events, one lock. A subclass sets `medium`, fills
    `_index` and says where a record's data is (`_slot`)."""

    medium = ""

    def __init__(self) -> None:
        self._index: OrderedDict[int, object] = OrderedDict()
        self._pins: dict[int, int] = {}
        self._events: list[KVEvent] = []
        self._lock = threading.Lock()
        self.stats: dict[str, int] = {"stored": 0, "loaded": 0, "evicted": 0}

    def _slot(self, record: object) -> object:
        return record

    def lookup(self, hashes: Sequence[int]) -> int:
        with self._lock:
            return leading_hits(self._index, hashes)

    def prepare_load(self, hashes: Sequence[int]) -> LoadJob:
        with self._lock:
            missing = [h for h in hashes if h not in self._index]
            if missing:
                raise TierError(f"{self.medium} tier: block {missing[0]:#x} is not held")
            pin(self._pins, hashes)
            job = LoadJob(list(hashes))
            for h in hashes:
                self._index.move_to_end(h)
                job.slots.append(self._slot(self._index[h]))
            return job

    def complete_load(self, job: LoadJob) -> None:
        """Unpin the job's blocks (idempotent)."""
        if job.done:
            return
        job.done = True
        with self._lock:
            unpin(self._pins, job.hashes)
            self.stats["loaded"] += len(job.hashes)
            self._after_load()

    def _after_load(self) -> None:
        """Called under the lock once a load's pins are gone."""

    @property
    def num_held(self) -> int:
        return len(self._index)

    def held(self) -> list[int]:
        """Held hashes, least recently used first (tests, metrics)."""
        with self._lock:
            return list(self._index)

    def take_events(self) -> list[KVEvent]:
        with self._lock:
            events, self._events = self._events, []
            return events
