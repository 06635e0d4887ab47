"""The router's KV-prefix index: which worker holds which prefix of a prompt.

Block hashes are chained (`kv_manager.hashing`): the hash of block i covers every token of
blocks 0..i, so one hash names one node of the radix tree over token blocks. The index keeps
that tree flattened: `owners[hash]` is a bitmask of the workers holding that node (each
worker gets a bit), and each worker keeps its own hashes (for removal). A lookup walks the
prompt's hashes from the root, AND-ing masks until no worker is left, so `find_matches` costs
one lookup and one integer AND per prompt block, whatever the size of the index. Masks are
plain ints, so the index adds nothing for the garbage collector to traverse.

`owners` is an `OwnerTable` (`_owners.c`, built by `pip install -e .`): a flat C hash table
whose walk is one C loop with each lookup prefetched ahead, about 4x faster than a dict when
the index is out of the CPU caches, as it is between requests. It holds 64-bit hashes and up
to 64 workers; an index that outgrows that (or runs where the extension is not built) keeps
`owners` in a dict and walks it in Python, with the same results.

Tiers: a worker's block can sit in several tiers at once (each event names its `medium`:
"GPU" the device pool, "CPU" host memory, "DISK" the disk tier; vLLM publishes the first
two). It stays in `owners` while any tier holds it, so `find_matches` counts it whatever the
tier. `find_weighted_matches` also weighs each matched block by the best tier holding it
(device 1, host `host_tier_weight`, disk `disk_tier_weight`; Dynamo's defaults 0.75 and
0.25; a medium the index does not know counts as disk): the policy's prefill estimate. To
keep the all-device case at one lookup and one AND per block, each worker counts its blocks
that no device tier holds; only a matched worker with such blocks has its matched prefix
walked again (one dict lookup per block in its own table).

Approximate mode (engines that publish no events): after each decision the router calls
`assume_cached(worker, hashes)`; those entries expire `ttl_s` after they were last assumed.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable, Sequence
from functools import reduce
from itertools import islice, repeat
from operator import or_

from kv_manager.events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent
from trident.core.errors import ConfigError

try:
    from router_ensemble.routing._owners import OwnerTable
except ImportError:  # not built (no C compiler): owners stay in a dict
    OwnerTable = None

logger = logging.getLogger(__name__)
_TABLE_WORKERS = 64  # an OwnerTable holds 64-bit masks

_GPU, _CPU, _DISK = 1, 2, 4
_MEDIUM_BITS = {None: _GPU, "GPU": _GPU, "CPU": _CPU, "DISK": _DISK}
_OTHER_MEDIUM = 8
_ASSUMED = 16  # approximate mode: assumed cached by the router itself (in the device pool)
_DEVICE = _GPU | _ASSUMED
_TIER_BITS = 32  # every combination of the bits above


def tier_weights(host_tier_weight: float, disk_tier_weight: float) -> list[float]:
    """Weight of a block by its tier bits: the best tier holding it decides."""
    for name, value in (
        ("host_tier_weight", host_tier_weight),
        ("disk_tier_weight", disk_tier_weight),
    ):
        if not math.isfinite(value) or not 0 <= value <= 1:
            raise ConfigError(
                f"{name} must be between 0 and 1 (a device hit counts 1), got {value}"
            )
    weights = []
    for bits in range(_TIER_BITS):
        if bits & _DEVICE:
            weights.append(1.0)
        elif bits & _CPU:
            weights.append(host_tier_weight)
        elif bits & (_DISK | _OTHER_MEDIUM):
            weights.append(disk_tier_weight)
        else:
            weights.append(0.0)
    return weights


def _walk_dict(
    owners: dict[int, int], block_hashes: Sequence[int], mask: int
) -> list[tuple[int, int]]:
    """`OwnerTable.walk` over a dict: AND each block's owners into `mask` until it is 0;
    (depth, bits) for the workers that dropped out after depth > 0 blocks, then
    (len(block_hashes), bits) for those that held every block."""
    changes = []
    depth = 0
    for block_hash in block_hashes:
        held = owners.get(block_hash, 0) & mask
        if held != mask:
            if depth:
                changes.append((depth, mask & ~held))
            mask = held
            if not mask:
                return changes
        depth += 1
    changes.append((depth, mask))
    return changes


class _Worker:
    __slots__ = ("worker_id", "bit", "blocks", "lower")

    def __init__(self, worker_id: str, bit: int) -> None:
        self.worker_id = worker_id
        self.bit = bit
        self.blocks: dict[int, int] = {}  # hash -> tier bits
        self.lower = 0  # blocks no device tier holds (only host, disk, ...)


class KvIndex:
    """Per-worker sets of cached block hashes with prefix matching.

    Who calls it: the subscriber thread applies events (`apply_events`, `remove_worker`); the
    router's `decide` calls `find_weighted_matches` (and `assume_cached` in approximate mode)
    from any request thread. One lock guards all state; no call blocks on I/O.
    Blocks: the index owns nothing but hashes; the workers own their blocks.
    """

    def __init__(
        self,
        *,
        approximate: bool = False,
        ttl_s: float = 120.0,
        clock: Callable[[], float] = time.monotonic,
        host_tier_weight: float = 0.75,
        disk_tier_weight: float = 0.25,
    ) -> None:
        if ttl_s <= 0:
            raise ConfigError(f"approx_ttl_s must be positive, got {ttl_s}")
        self._weights = tier_weights(host_tier_weight, disk_tier_weight)
        self.approximate = approximate
        self.ttl_s = ttl_s
        self._clock = clock
        self._lock = threading.Lock()
        # hash -> bitmask of workers (an OwnerTable has the part of dict's API used here)
        self._owners: dict[int, int] = OwnerTable() if OwnerTable is not None else {}
        self._workers: dict[str, _Worker] = {}
        self._bits: dict[str, int] = {}  # worker -> its bit
        self._names: dict[int, str] = {}  # bit -> worker
        self._free_slots: list[int] = []  # bit positions of removed workers, for reuse
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
            del self._bits[worker_id], self._names[worker.bit]
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
        """worker -> number of leading blocks of `block_hashes` it holds in any tier (only
        workers > 0)."""
        if not block_hashes:
            return {}
        with self._lock:
            return self._match_locked(block_hashes, candidates)

    def find_weighted_matches(
        self, block_hashes: Sequence[int], candidates: Collection[str] | None = None
    ) -> tuple[dict[str, int], dict[str, float]]:
        """`find_matches`, and each matched worker's overlap with every block weighed by the
        best tier holding it (equal to the block count when a device tier holds them all)."""
        if not block_hashes:
            return {}, {}
        with self._lock:
            matched = self._match_locked(block_hashes, candidates)
            weighted: dict[str, float] = dict(matched)
            workers = self._workers
            for worker_id, depth in matched.items():
                worker = workers[worker_id]
                if worker.lower:
                    tiers = map(worker.blocks.__getitem__, islice(block_hashes, depth))
                    weighted[worker_id] = sum(map(self._weights.__getitem__, tiers))
        return matched, weighted

    @property
    def native(self) -> bool:
        """Whether the owners live in the C `OwnerTable` (else in a dict)."""
        return not isinstance(self._owners, dict)

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
            slot = self._free_slots.pop() if self._free_slots else len(self._bits)
            if slot >= _TABLE_WORKERS:
                self._owners_to_dict()
            worker = _Worker(worker_id, 1 << slot)
            self._workers[worker_id] = worker
            self._bits[worker_id] = worker.bit
            self._names[worker.bit] = worker_id
        return worker

    def _match_locked(
        self, block_hashes: Sequence[int], candidates: Collection[str] | None
    ) -> dict[str, int]:
        matched: dict[str, int] = {}
        if self._expiry:
            self._prune_locked()
        if candidates is None:
            mask = -1
        else:
            mask = reduce(or_, map(self._bits.get, candidates, repeat(0)), 0)
            if not mask:
                return matched
        owners = self._owners
        if isinstance(owners, dict):
            changes = _walk_dict(owners, block_hashes, mask)
        else:
            changes = owners.walk(block_hashes, mask)
        names = self._names
        for depth, bits in changes:
            while bits:  # one entry per worker in bits
                low = bits & -bits
                matched[names[low]] = depth
                bits ^= low
        return matched

    def _add(self, worker: _Worker, block_hash: int, tier: int) -> None:
        blocks = worker.blocks
        bits = blocks.get(block_hash, 0)
        if not bits:
            owners = self._owners
            try:
                owners[block_hash] = owners.get(block_hash, 0) | worker.bit
            except (OverflowError, TypeError):  # not a 64-bit hash: an OwnerTable cannot hold it
                self._owners_to_dict()
                self._owners[block_hash] = self._owners.get(block_hash, 0) | worker.bit
            if not tier & _DEVICE:
                worker.lower += 1
        elif tier & _DEVICE and not bits & _DEVICE:
            worker.lower -= 1
        blocks[block_hash] = bits | tier

    def _drop(self, worker: _Worker, block_hash: int, tier: int) -> None:
        blocks = worker.blocks
        bits = blocks.get(block_hash, 0)
        if not bits:
            return
        rest = bits & ~tier
        if rest:
            blocks[block_hash] = rest
            if bits & _DEVICE and not rest & _DEVICE:
                worker.lower += 1
            return
        del blocks[block_hash]
        if not bits & _DEVICE:
            worker.lower -= 1
        self._unown(block_hash, worker.bit)

    def _owners_to_dict(self) -> None:
        if not isinstance(self._owners, dict):
            logger.info("kv index: owners move to a dict (over 64 workers or a non-64-bit hash)")
            self._owners = dict(self._owners.items())

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
        worker.lower = 0
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
