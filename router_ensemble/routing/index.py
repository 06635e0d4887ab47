"""The router's KV-prefix index: which worker holds which prefix of a prompt.

Block hashes are chained (`kv_manager.hashing`): the hash of block i covers every token of
blocks 0..i, so one hash names one node of the radix tree over token blocks. The index keeps
that tree flattened: `owners[hash]` is a bitmask of the workers holding that node (each
worker gets a bit), and each worker keeps its own hashes (for removal). A lookup walks the
prompt's hashes from the root, AND-ing masks until no worker is left, so `find_matches` costs
one dict lookup and one integer AND per prompt block, whatever the size of the index. Masks
are plain ints, so the index adds nothing for the garbage collector to traverse.

A worker's block can sit in several tiers at once (vLLM publishes a `medium` per event: GPU,
CPU, ...); it stays in the index while any tier holds it.

Approximate mode (engines that publish no events): after each decision the router calls
`assume_cached(worker, hashes)`; those entries expire `ttl_s` after they were last assumed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable, Sequence

from kv_manager.events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent
from trident.core.errors import ConfigError

logger = logging.getLogger(__name__)

_MEDIUM_BITS = {None: 1, "GPU": 1, "CPU": 2, "DISK": 4}
_OTHER_MEDIUM = 8
_ASSUMED = 16  # approximate mode: assumed cached by the router itself


class _Worker:
    __slots__ = ("worker_id", "bit", "blocks")

    def __init__(self, worker_id: str, bit: int) -> None:
        self.worker_id = worker_id
        self.bit = bit
        self.blocks: dict[int, int] = {}  # hash -> tier bits


class KvIndex:
    """Per-worker sets of cached block hashes with prefix matching.

    Who calls it: the subscriber thread applies events (`apply_events`, `remove_worker`); the
    router's `decide` calls `find_matches` (and `assume_cached` in approximate mode) from any
    request thread. One lock guards all state; no call blocks on I/O.
    Blocks: the index owns nothing but hashes; the workers own their blocks.
    """

    def __init__(
        self,
        *,
        approximate: bool = False,
        ttl_s: float = 120.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if ttl_s <= 0:
            raise ConfigError(f"approx_ttl_s must be positive, got {ttl_s}")
        self.approximate = approximate
        self.ttl_s = ttl_s
        self._clock = clock
        self._lock = threading.Lock()
        self._owners: dict[int, int] = {}  # hash -> bitmask of workers
        self._workers: dict[str, _Worker] = {}
        self._by_slot: dict[int, _Worker] = {}  # bit position -> worker
        self._free_slots: list[int] = []
        self._expiry: OrderedDict[tuple[str, int], float] = OrderedDict()  # oldest first

    # ------------------------------------------------------------ updates

    def apply_event(self, worker_id: str, event: KVEvent) -> None:
        self.apply_events(worker_id, (event,))

    def apply_events(self, worker_id: str, events: Iterable[KVEvent]) -> None:
        with self._lock:
            worker = self._worker(worker_id)
            for event in events:
                if isinstance(event, BlockStored):
                    tier = _MEDIUM_BITS.get(event.medium, _OTHER_MEDIUM)
                    for block_hash in event.block_hashes:
                        self._add(worker, block_hash, tier)
                elif isinstance(event, BlockRemoved):
                    tier = _MEDIUM_BITS.get(event.medium, _OTHER_MEDIUM)
                    for block_hash in event.block_hashes:
                        self._drop(worker, block_hash, tier)
                elif isinstance(event, AllBlocksCleared):
                    self._clear(worker)
                else:
                    logger.warning(
                        "kv index worker=%s: ignored %r", worker_id, type(event).__name__
                    )

    def assume_cached(self, worker_id: str, block_hashes: Sequence[int]) -> None:
        """Approximate mode: record that `worker_id` now holds these blocks, for `ttl_s`."""
        expires = self._clock() + self.ttl_s
        with self._lock:
            worker = self._worker(worker_id)
            expiry = self._expiry
            for block_hash in block_hashes:
                self._add(worker, block_hash, _ASSUMED)
                key = (worker_id, block_hash)
                expiry[key] = expires
                expiry.move_to_end(key)

    def clear_worker(self, worker_id: str) -> None:
        """Forget the worker's blocks but keep it known (AllBlocksCleared, resync)."""
        with self._lock:
            worker = self._workers.get(worker_id)
            if worker is not None:
                self._clear(worker)

    def remove_worker(self, worker_id: str) -> int:
        """Drop a worker and all its entries; returns how many blocks it held."""
        with self._lock:
            worker = self._workers.pop(worker_id, None)
            if worker is None:
                return 0
            count = len(worker.blocks)
            self._clear(worker)
            slot = worker.bit.bit_length() - 1
            del self._by_slot[slot]
            self._free_slots.append(slot)
            return count

    def prune(self) -> int:
        """Drop expired assumed entries; returns how many expired."""
        with self._lock:
            return self._prune_locked()

    # ------------------------------------------------------------ queries

    def find_matches(
        self, block_hashes: Sequence[int], candidates: Collection[str] | None = None
    ) -> dict[str, int]:
        """worker -> number of leading blocks of `block_hashes` it holds (only workers > 0)."""
        matched: dict[str, int] = {}
        if not block_hashes:
            return matched
        with self._lock:
            if self._expiry:
                self._prune_locked()
            if candidates is None:
                mask = -1
            else:
                workers = self._workers
                mask = 0
                for worker_id in candidates:
                    worker = workers.get(worker_id)
                    if worker is not None:
                        mask |= worker.bit
                if not mask:
                    return matched
            owners = self._owners
            depth = 0
            for block_hash in block_hashes:
                held = owners.get(block_hash, 0) & mask
                if held != mask:
                    if depth:
                        self._record(matched, mask & ~held, depth)
                    mask = held
                    if not mask:
                        return matched
                depth += 1
            self._record(matched, mask, depth)
        return matched

    def workers(self) -> list[str]:
        with self._lock:
            return list(self._workers)

    def num_blocks(self, worker_id: str | None = None) -> int:
        """Blocks held by one worker, or distinct hashes in the whole index."""
        with self._lock:
            if worker_id is None:
                return len(self._owners)
            worker = self._workers.get(worker_id)
            return 0 if worker is None else len(worker.blocks)

    def contains(self, worker_id: str, block_hash: int) -> bool:
        with self._lock:
            worker = self._workers.get(worker_id)
            return worker is not None and block_hash in worker.blocks

    # ------------------------------------------------------------ internals (lock held)

    def _worker(self, worker_id: str) -> _Worker:
        worker = self._workers.get(worker_id)
        if worker is None:
            slot = self._free_slots.pop() if self._free_slots else len(self._by_slot)
            worker = _Worker(worker_id, 1 << slot)
            self._workers[worker_id] = worker
            self._by_slot[slot] = worker
        return worker

    def _record(self, matched: dict[str, int], mask: int, depth: int) -> None:
        by_slot = self._by_slot
        while mask:
            low = mask & -mask
            matched[by_slot[low.bit_length() - 1].worker_id] = depth
            mask ^= low

    def _add(self, worker: _Worker, block_hash: int, tier: int) -> None:
        blocks = worker.blocks
        bits = blocks.get(block_hash, 0)
        if not bits:
            self._owners[block_hash] = self._owners.get(block_hash, 0) | worker.bit
        blocks[block_hash] = bits | tier

    def _drop(self, worker: _Worker, block_hash: int, tier: int) -> None:
        blocks = worker.blocks
        bits = blocks.get(block_hash, 0)
        if not bits:
            return
        bits &= ~tier
        if bits:
            blocks[block_hash] = bits
            return
        del blocks[block_hash]
        self._unown(block_hash, worker.bit)

    def _unown(self, block_hash: int, bit: int) -> None:
        rest = self._owners.get(block_hash, 0) & ~bit
        if rest:
            self._owners[block_hash] = rest
        else:
            self._owners.pop(block_hash, None)

    def _clear(self, worker: _Worker) -> None:
        for block_hash in worker.blocks:
            self._unown(block_hash, worker.bit)
        worker.blocks.clear()
        # Stale expiry keys are skipped by _prune_locked (the block is gone or re-assumed).

    def _prune_locked(self) -> int:
        now = self._clock()
        expiry = self._expiry
        expired = 0
        while expiry:
            (worker_id, block_hash), when = next(iter(expiry.items()))
            if when > now:
                break
            expiry.popitem(last=False)
            worker = self._workers.get(worker_id)
            if worker is not None and worker.blocks.get(block_hash, 0) & _ASSUMED:
                self._drop(worker, block_hash, _ASSUMED)
                expired += 1
        return expired
