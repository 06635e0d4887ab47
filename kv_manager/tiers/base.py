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

A tier is used by one engine: its loop thread prepares and completes, its offload thread
writes and reads; a lock inside each tier keeps the index consistent between them.
`take_events()` drains the tier's events (medium "CPU" or "DISK") for the worker's publisher.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
