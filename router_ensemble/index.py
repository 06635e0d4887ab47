"""The router's KV-prefix index: which worker holds which prefix of a prompt.

Block hashes are chained (`kv_manager.hashing`): the hash of block i covers every token of
blocks 0..i, so one hash names one node of the radix tree over token blocks. The index keeps
that tree flattened: `owners[hash] -> {worker}` (the workers holding that node) and, per
worker, the set of its hashes (for removal). A lookup walks the prompt's hashes from the root
and narrows the set of workers still matching, so `find_matches` costs O(prompt blocks) set
operations on at most the live workers, whatever the size of the index.

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
from trident.errors import ConfigError

logger = logging.getLogger(__name__)

_MEDIUM_BITS = {None: 1, "GPU": 1, "CPU": 2, "DISK": 4}
_OTHER_MEDIUM = 8
_ASSUMED = 16  # approximate mode: assumed cached by the router itself


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
        self._owners: dict[int, set[str]] = {}
        self._blocks: dict[str, dict[int, int]] = {}  # worker -> hash -> tier bits
        self._expiry: OrderedDict[tuple[str, int], float] = OrderedDict()  # oldest first

    # ------------------------------------------------------------ updates

    def apply_event(self, worker_id: str, event: KVEvent) -> None:
        self.apply_events(worker_id, (event,))

    def apply_events(self, worker_id: str, events: Iterable[KVEvent]) -> None:
        with self._lock:
            blocks = self._blocks.setdefault(worker_id, {})
            for event in events:
                if isinstance(event, BlockStored):
                    bit = _MEDIUM_BITS.get(event.medium, _OTHER_MEDIUM)
                    for block_hash in event.block_hashes:
                        self._add(worker_id, blocks, block_hash, bit)
                elif isinstance(event, BlockRemoved):
                    bit = _MEDIUM_BITS.get(event.medium, _OTHER_MEDIUM)
                    for block_hash in event.block_hashes:
                        self._drop(worker_id, blocks, block_hash, bit)
                elif isinstance(event, AllBlocksCleared):
                    self._clear(worker_id, blocks)
                else:
                    logger.warning(
                        "kv index worker=%s: ignored %r", worker_id, type(event).__name__
                    )

    def assume_cached(self, worker_id: str, block_hashes: Sequence[int]) -> None:
        """Approximate mode: record that `worker_id` now holds these blocks, for `ttl_s`."""
        expires = self._clock() + self.ttl_s
        with self._lock:
            blocks = self._blocks.setdefault(worker_id, {})
            expiry = self._expiry
            for block_hash in block_hashes:
                self._add(worker_id, blocks, block_hash, _ASSUMED)
                key = (worker_id, block_hash)
                expiry[key] = expires
                expiry.move_to_end(key)

    def clear_worker(self, worker_id: str) -> None:
        """Forget the worker's blocks but keep it known (AllBlocksCleared, resync)."""
        with self._lock:
            blocks = self._blocks.get(worker_id)
            if blocks is not None:
                self._clear(worker_id, blocks)

    def remove_worker(self, worker_id: str) -> int:
        """Drop a worker and all its entries; returns how many blocks it held."""
        with self._lock:
            blocks = self._blocks.pop(worker_id, None)
            if blocks is None:
                return 0
            count = len(blocks)
            self._clear(worker_id, blocks)
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
            owners = self._owners
            first = owners.get(block_hashes[0])
            if not first:
                return matched
            active = set(first) if candidates is None else first.intersection(candidates)
            for depth, block_hash in enumerate(block_hashes):
                holders = owners.get(block_hash)
                if holders is None:
                    break
                if active <= holders:
                    continue
                for worker in active.difference(holders):
                    matched[worker] = depth
                active.intersection_update(holders)
                if not active:
                    return matched
            else:
                depth = len(block_hashes)
            for worker in active:
                matched[worker] = depth
        return matched

    def workers(self) -> list[str]:
        with self._lock:
            return list(self._blocks)

    def num_blocks(self, worker_id: str | None = None) -> int:
        """Blocks held by one worker, or distinct hashes in the whole index."""
        with self._lock:
            if worker_id is None:
                return len(self._owners)
            return len(self._blocks.get(worker_id, ()))

    def contains(self, worker_id: str, block_hash: int) -> bool:
        with self._lock:
            return block_hash in self._blocks.get(worker_id, ())

    # ------------------------------------------------------------ internals (lock held)

    def _add(self, worker_id: str, blocks: dict[int, int], block_hash: int, bit: int) -> None:
        bits = blocks.get(block_hash, 0)
        if not bits:
            holders = self._owners.get(block_hash)
            if holders is None:
                self._owners[block_hash] = {worker_id}
            else:
                holders.add(worker_id)
        blocks[block_hash] = bits | bit

    def _drop(self, worker_id: str, blocks: dict[int, int], block_hash: int, bit: int) -> None:
        bits = blocks.get(block_hash, 0) & ~bit
        if bits:
            blocks[block_hash] = bits
            return
        if blocks.pop(block_hash, None) is None:
            return
        holders = self._owners.get(block_hash)
        if holders is not None:
            holders.discard(worker_id)
            if not holders:
                del self._owners[block_hash]

    def _clear(self, worker_id: str, blocks: dict[int, int]) -> None:
        owners = self._owners
        for block_hash in blocks:
            holders = owners.get(block_hash)
            if holders is not None:
                holders.discard(worker_id)
                if not holders:
                    del owners[block_hash]
        blocks.clear()
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
            blocks = self._blocks.get(worker_id)
            if blocks is not None and blocks.get(block_hash, 0) & _ASSUMED:
                self._drop(worker_id, blocks, block_hash, _ASSUMED)
                expired += 1
        return expired
