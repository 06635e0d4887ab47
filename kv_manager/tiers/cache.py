"""The tiered KV cache under a worker's device pool: offload to host memory and disk in the
background, onboard a prefix that misses the device pool but hits a lower tier.

Who calls what: the engine's `KVCacheManager`, on the engine loop thread, is the only
caller (`offer`, `offload_now`, `lookup`, `start_load`, `poll_finished`, `poll_released`,
`take_events`, `counters`, `close`). Two threads of the cache's own do the copies:
`kv-offload` (device block -> host slot, disk file) and `kv-onboard` (tier -> device
blocks), so an onboarding never queues behind a backlog of stores.

Blocks: the manager owns the device blocks. A block offered for a background store carries a
reference the manager took (`pool.touch`); its id comes back from `poll_released()` once
copied, and the manager drops the reference. An onboarding writes into blocks the manager
reserved for the load, exactly like a pull from a prefill worker (`KVLoader` contract). The
tiers own their slots and files; loads pin what they read until `complete_load`.

Offload policies (`TorchEngineConfig.kv_offload`):
- `write_through`: every full block, when it enters the device prefix cache, is copied down on
  the offload thread; the step goes on at once. A device eviction then loses nothing.
- `evict`: a block is copied to the tiers when the device pool evicts it, synchronously on
  the loop thread (the block is about to be overwritten), so fewer bytes move but the step
  that allocates pays for the copy.
Either way a block that is reused (a device prefix hit) is offered again, which is what
admits it to the disk tier (`DiskTier.admit_after`).
"""

from __future__ import annotations

import logging
import threading
import time
from array import array
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from kv_manager.events import KVEvent
from kv_manager.kv_cache_manager import KVLoad, LoadDone
from kv_manager.tiers.base import BlockKey, IndexedTier, LoadJob, TierError
from trident.core.types import TierStats

log = logging.getLogger(__name__)

POLICIES = ("write_through", "evict")


@dataclass(slots=True)
class _Counters:
    offloaded: int = 0  # blocks written into the tier
    onboarded: int = 0  # blocks read from the tier into device blocks
    queried: int = 0  # prompt blocks the device pool missed, of admitted requests
    hits: int = 0  # of those, onboarded from this tier
    bytes_offloaded: int = 0
    bytes_onboarded: int = 0
    onboard_seconds: float = 0.0
    failed: int = 0  # stores or loads that failed (full disk, corrupt file)


@dataclass(slots=True)
class _Store:
    block_ids: list[int]
    keys: list[BlockKey]


@dataclass(slots=True)
class _Plan:
    """An onboarding: which tier and job each block comes from, in prompt order."""

    load: KVLoad
    parts: list[tuple[IndexedTier, LoadJob, int]] = field(default_factory=list)
    jobs: list[tuple[IndexedTier, LoadJob]] = field(default_factory=list)


class TieredCache:
    """Tiers fastest first (host, then disk) over one device pool. See the module docstring."""

    def __init__(
        self,
        tiers: Sequence[IndexedTier],
        pool: torch.Tensor,
        *,
        on_done: Callable[[], None] | None = None,
        max_pending_blocks: int = 0,
        name: str = "kv",
    ) -> None:
        if not tiers:
            raise TierError("a tiered cache needs at least one tier")
        self.tiers = list(tiers)
        self.pool = pool
        self._block_nbytes = pool[0].numel() * pool.element_size()
        self._on_done = on_done
        self._max_pending = max_pending_blocks or pool.shape[0]
        self._counters = {t.medium: _Counters() for t in self.tiers}
        self._lock = threading.Lock()
        self._released: list[list[int]] = []
        self._finished: list[LoadDone] = []
        self._pending_blocks = 0  # offered, not yet released (loop thread)
        self._loads = 0  # started, not yet reported (loop thread)
        self._offload = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{name}-offload")
        self._onboard = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{name}-onboard")
        self._closed = False
        self._events: list[KVEvent] = []
        for tier in self.tiers:
            announce = getattr(tier, "announce", None)
            if announce is not None:  # a restarted worker tells the router what survived
                self._events.extend(announce())

    # -- offload ---------------------------------------------------------------------------
    def offer(self, block_ids: Sequence[int], keys: Sequence[BlockKey]) -> int:
        """Queue a background store of device blocks the caller has referenced; returns how
        many of the first ones were taken. The rest are refused (the caller drops their
        references) while the offload thread is `max_pending_blocks` behind: the step never
        waits for it."""
        n = 0 if self._closed else max(0, min(len(block_ids), self._max_pending - self._pending_blocks))
        if n:
            self._pending_blocks += n
            self._offload.submit(self._store, _Store(list(block_ids[:n]), list(keys[:n])))
        return n

    def offload_now(self, block_id: int, key: BlockKey) -> None:
        """Copy one block down synchronously (offload on eviction; loop thread)."""
        self._write(_Store([block_id], [key]))

    def poll_released(self) -> list[int]:
        """Ids of offered blocks whose copies are done; the caller drops its references."""
        with self._lock:
            batches, self._released = self._released, []
        ids = [i for batch in batches for i in batch]
        self._pending_blocks -= len(ids)
        return ids

    def _store(self, store: _Store) -> None:
        try:
            self._write(store)
        finally:
            with self._lock:
                self._released.append(store.block_ids)
            if self._on_done is not None:
                self._on_done()

    def _write(self, store: _Store) -> None:
        by_hash = dict(zip((k.block_hash for k in store.keys), store.block_ids, strict=True))
        sync = self.pool.is_cuda
        for tier in self.tiers:
            job = tier.prepare_store(store.keys)
            if not job.keys:
                tier.complete_store(job, True)
                continue
            c = self._counters[tier.medium]
            try:
                for i, key in enumerate(job.keys):
                    tier.write(job, i, self.pool[by_hash[key.block_hash]])
                if sync:
                    torch.cuda.current_stream(self.pool.device).synchronize()
            except Exception as exc:  # a full disk: no offload, no error to any request
                tier.complete_store(job, False)
                c.failed += 1
                log.warning("%s tier: store of %d blocks failed: %s", tier.medium, len(job.keys), exc)
                continue
            tier.complete_store(job, True)
            c.offloaded += len(job.keys)
            c.bytes_offloaded += len(job.keys) * self._block_nbytes

    # -- onboard ---------------------------------------------------------------------------
    def lookup(self, hashes: Sequence[int]) -> int:
        """How many of `hashes` (the prompt blocks after the device hits), from the first,
        some tier holds."""
        n = 0
        for h in hashes:
            if not any(t.lookup((h,)) for t in self.tiers):
                break
            n += 1
        return n

    def count_query(self, num_blocks: int) -> None:
        """A request was admitted with `num_blocks` prompt blocks the device pool missed
        (the denominator of every tier's hit rate)."""
        with self._lock:
            for c in self._counters.values():
                c.queried += num_blocks

    def start_load(self, load: KVLoad) -> None:
        """Pin the blocks named by `load.source` (u64 hashes) in their tiers and read them
        into `load.block_ids` on the onboard thread. Raises if a block is gone already."""
        if self._closed:
            raise TierError("the tiered cache is closed")
        hashes = array("Q", load.source).tolist()
        plan = _Plan(load)
        planned: set[int] = set()
        try:
            for tier in self.tiers:
                mine = [h for h in hashes if h not in planned and tier.lookup((h,))]
                if not mine:
                    continue
                planned.update(mine)
                job = tier.prepare_load(mine)
                plan.jobs.append((tier, job))
                for i, _ in enumerate(mine):
                    plan.parts.append((tier, job, i))
            order = {h: i for i, h in enumerate(hashes)}
            plan.parts.sort(key=lambda p: order[p[1].hashes[p[2]]])
            if len(plan.parts) != len(hashes):
                raise TierError(f"{len(hashes) - len(plan.parts)} of {len(hashes)} blocks left the tiers")
        except Exception:
            _release(plan)
            raise
        self._loads += 1
        self._onboard.submit(self._read, plan)

    def poll_finished(self) -> list[LoadDone]:
        with self._lock:
            done, self._finished = self._finished, []
        self._loads -= len(done)
        return done

    def busy(self) -> bool:
        """Stores or loads in flight or unreported (the engine loop keeps polling)."""
        return bool(self._pending_blocks or self._loads)

    def _read(self, plan: _Plan) -> None:
        error: Exception | None = RuntimeError(f"onboarding of {plan.load.request_id} was interrupted")
        t0 = time.perf_counter()
        try:
            if self.pool.is_cuda:
                torch.cuda.set_device(self.pool.device)
            for (tier, job, i), block_id in zip(plan.parts, plan.load.block_ids, strict=True):
                tier.read(job, i, self.pool[block_id])
            if self.pool.is_cuda:
                torch.cuda.current_stream(self.pool.device).synchronize()
            error = None
        except Exception as exc:  # the scheduler recomputes the prompt
            error = exc
        finally:
            _release(plan)
            self._count_load(plan, error, time.perf_counter() - t0)
            with self._lock:
                self._finished.append(LoadDone(plan.load.load_id, error))
            if self._on_done is not None:
                self._on_done()

    def _count_load(self, plan: _Plan, error: Exception | None, seconds: float) -> None:
        with self._lock:
            for tier, job in plan.jobs:
                c = self._counters[tier.medium]
                if error is not None:
                    c.failed += 1
                    continue
                c.hits += len(job.hashes)
                c.onboarded += len(job.hashes)
                c.bytes_onboarded += len(job.hashes) * self._block_nbytes
                c.onboard_seconds += seconds * len(job.hashes) / len(plan.parts)

    # -- events, stats, shutdown -----------------------------------------------------------
    def take_events(self) -> list[KVEvent]:
        events, self._events = self._events, []
        for tier in self.tiers:
            events.extend(tier.take_events())
        return events

    def counters(self) -> tuple[TierStats, ...]:
        with self._lock:
            return tuple(
                TierStats(
                    medium=t.medium, held_blocks=t.num_held, offloaded=c.offloaded,
                    onboarded=c.onboarded, queried=c.queried, hits=c.hits,
                    bytes_offloaded=c.bytes_offloaded, bytes_onboarded=c.bytes_onboarded,
                    onboard_seconds=c.onboard_seconds, failed=c.failed,
                )
                for t, c in ((t, self._counters[t.medium]) for t in self.tiers)
            )

    def close(self) -> None:
        """Wait for copies in flight (idempotent); `poll_*` still report them after."""
        self._closed = True
        self._onboard.shutdown(wait=True)
        self._offload.shutdown(wait=True)


def _release(plan: _Plan) -> None:
    for tier, job in plan.jobs:
        tier.complete_load(job)
