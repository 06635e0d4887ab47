"""The KV-cache manager: where a scheduler gets, caches and frees KV blocks (vLLM v1's
`KVCacheManager`, nano-vllm's `BlockManager`), and the one path by which KV computed
elsewhere arrives.

Who calls what: an engine builds a `BlockPool`, an optional `KVLoader` and one
`KVCacheManager` over them, and hands the manager to its scheduler. From then on only the
engine loop thread calls the manager (no locking); the manager owns the pool and every block
in it. A request's `block_table` is the manager's record of the blocks lent to that request:
the manager writes it, the model runner reads it.

Verbs, in the order a request meets them:

- `get_computed_blocks(req, num_tokens)`: the longest run of prefix-cache hits among the
  full blocks of the first `num_tokens` tokens (not yet referenced).
- `allocate_slots(req, num_new_tokens, new_computed_blocks, num_external_computed_tokens)`:
  take the hits and enough new blocks for every token; `None` (and nothing changed) when the
  pool is short: running out of blocks is a value, the scheduler preempts or waits.
- `start_load(req, source, num_tokens, skip_blocks)` / `finished_loads()`: the two phases of
  an external load. KV computed elsewhere (pulled from a prefill worker today; read back from
  host memory or disk by a tiered cache next) is written by a `KVLoader` into blocks that
  `allocate_slots` reserved with `num_external_computed_tokens`. The loader works in the
  background; `finished_loads()` reports each load once, with `None` or its exception.
- `cache_blocks(req, num_full)`: register newly full blocks in the prefix cache.
- `free(req)`: give the request's blocks back. While its load is in flight the blocks stay
  held (the loader may still write into them) and are freed when the load reports done.
- `lend(req, n)` / `take_back(block_ids)`: blocks leave a request under a transfer lease and
  come back when it ends (`kv_manager.transfer`).
- `close()`: wait for loads in flight and free their blocks (shutdown).

A tiered cache (`KVTiers`, built by `kv_manager.tiers.cache`) plugs in beside the loader:
`lookup_tiers` says how many prompt blocks after the device hits a lower tier holds, they
become `num_external_computed_tokens`, and `start_tier_load` onboards them through this same
path. Offload: with `write_through`, `cache_blocks` offers every newly cached block (and
`offer_hits` every reused one) for a background copy, holding a reference on each block until
the copy is done; with `evict`, the pool's eviction hook copies a block down before reuse.
"""

from __future__ import annotations

import itertools
import logging
import threading
from array import array
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

from kv_manager.block_pool import Block, BlockPool
from kv_manager.events import KVEvent
from kv_manager.hashing import BlockHash
from kv_manager.tiers.base import BlockKey

log = logging.getLogger(__name__)


class KVRequest(Protocol):
    """What the manager reads and writes on a request (the torch engine's `Sequence`)."""

    token_ids: list[int]
    block_table: list[Block]
    num_computed: int  # tokens whose KV is in `block_table`
    num_cached_blocks: int  # leading blocks already registered in the prefix cache

    @property
    def request_id(self) -> str: ...

    def hashes_upto(self, num_blocks: int, block_size: int) -> list[BlockHash]: ...


@dataclass(frozen=True, slots=True)
class KVLoad:
    """Fill `block_ids` with the KV of the request's prompt blocks `skip_blocks`,
    `skip_blocks + 1`, ... of `num_tokens` tokens in all. `source` is opaque to the manager
    (a prefill worker's KV descriptor; a tier's key later)."""

    load_id: int
    request_id: str
    source: bytes
    num_tokens: int
    skip_blocks: int
    block_ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class LoadDone:
    """A load ended: its blocks are no longer written. `error` is None on success."""

    load_id: int
    error: Exception | None = None


class KVLoader(Protocol):
    """Writes externally computed KV into blocks the manager reserved, in the background.

    The manager calls `start_load` and `poll_finished` on the engine loop thread and
    `close` once at shutdown. `start_load` must not block on the copy; raising means the
    load did not start. Every started load is reported exactly once by `poll_finished`,
    also after `close`, which returns only when no load is writing any more.
    """

    def start_load(self, load: KVLoad) -> None: ...

    def poll_finished(self) -> list[LoadDone]: ...

    def close(self) -> None: ...


class KVTiers(KVLoader, Protocol):
    """The lower KV tiers as the manager uses them (`kv_manager.tiers.cache.TieredCache`):
    a `KVLoader` for onboarding, plus offload. Called on the engine loop thread only."""

    def lookup(self, hashes: Sequence[int]) -> int: ...

    def count_query(self, num_blocks: int) -> None: ...

    def offer(self, block_ids: Sequence[int], keys: Sequence[BlockKey]) -> int: ...

    def offload_now(self, block_id: int, key: BlockKey) -> None: ...

    def poll_released(self) -> list[int]: ...

    def busy(self) -> bool: ...

    def take_events(self) -> list[KVEvent]: ...


class ThreadedKVLoader:
    """A `KVLoader` running `load_fn(load)` on one background thread of its own, in start
    order, so whatever `load_fn` uses (a `KVImporterImpl`) is used by one thread at a time.
    `on_done` (e.g. waking the engine loop) is called on that thread after each load."""

    def __init__(
        self,
        load_fn: Callable[[KVLoad], None],
        on_done: Callable[[], None] | None = None,
        name: str = "kv-load",
    ) -> None:
        self._load_fn = load_fn
        self._on_done = on_done
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._lock = threading.Lock()
        self._done: list[LoadDone] = []
        self._closed = False

    def start_load(self, load: KVLoad) -> None:
        if self._closed:
            raise RuntimeError("the KV loader is closed")
        self._executor.submit(self._run, load)

    def poll_finished(self) -> list[LoadDone]:
        with self._lock:
            done, self._done = self._done, []
        return done

    def close(self) -> None:
        """Wait for the loads in flight (idempotent)."""
        self._closed = True
        self._executor.shutdown(wait=True)

    def _run(self, load: KVLoad) -> None:
        error: Exception | None = RuntimeError(f"KV load of {load.request_id} was interrupted")
        try:
            self._load_fn(load)
            error = None
        except Exception as exc:  # reported to the scheduler, which fails this request only
            error = exc
        finally:
            with self._lock:
                self._done.append(LoadDone(load.load_id, error))
            if self._on_done is not None:
                self._on_done()


@dataclass(slots=True, eq=False)
class _Loading:
    req: KVRequest
    abandoned: list[Block] | None = None  # the blocks of a request freed mid-load


class KVCacheManager:
    """Blocks, prefix cache and external loads for one engine. See the module docstring."""

    def __init__(
        self,
        pool: BlockPool,
        loader: KVLoader | None = None,
        tiers: KVTiers | None = None,
        offload: str = "write_through",
    ) -> None:
        self.pool = pool
        self.block_size = pool.block_size
        self.loader = loader
        self.tiers = tiers
        self._write_through = tiers is not None and offload == "write_through"
        if tiers is not None and offload == "evict":
            pool.on_evict = self._offload_evicted
        self._loads: dict[int, _Loading] = {}
        self._done: list[LoadDone] = []  # loads that failed to start
        self._ids = itertools.count()
        self._closed = False

    # -- queries -------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_used_blocks(self) -> int:
        return self.pool.num_used_blocks

    @property
    def num_cached_blocks(self) -> int:
        """Blocks registered in the prefix cache (in use or free)."""
        return len(self.pool.cached)

    def has_loads(self) -> bool:
        """Whether a load or an offload is in flight or unreported (the engine keeps polling)."""
        return bool(self._loads) or (self.tiers is not None and self.tiers.busy())

    def take_events(self) -> list[KVEvent]:
        events = self.pool.take_events()
        if self.tiers is not None:
            events += self.tiers.take_events()
        return events

    # -- prefix cache and allocation -----------------------------------------------------
    def get_computed_blocks(self, req: KVRequest, num_tokens: int) -> list[Block]:
        """Cached blocks for the longest prefix of full blocks within `num_tokens` tokens."""
        bs = self.block_size
        if not self.pool.enable_caching or num_tokens < bs:
            return []
        hits: list[Block] = []
        for i, h in enumerate(req.hashes_upto(num_tokens // bs, bs)):
            block = self.pool.get_cached_block(h, req.token_ids[i * bs : (i + 1) * bs])
            if block is None:
                break
            hits.append(block)
        return hits

    def allocate_slots(
        self,
        req: KVRequest,
        num_new_tokens: int,
        new_computed_blocks: Sequence[Block] = (),
        num_external_computed_tokens: int = 0,
    ) -> list[Block] | None:
        """Give `req` blocks for its computed tokens, the hits `new_computed_blocks` (from
        `get_computed_blocks`, on a request without blocks), `num_external_computed_tokens`
        to be loaded and `num_new_tokens` to compute. Returns the new blocks, or None with
        nothing changed when the pool is short."""
        if new_computed_blocks and req.block_table:
            raise ValueError(f"request {req.request_id} already has blocks; hits come first")
        bs = self.block_size
        num_tokens = (
            req.num_computed
            + len(new_computed_blocks) * bs
            + num_external_computed_tokens
            + num_new_tokens
        )
        need = max(0, -(-num_tokens // bs) - len(req.block_table) - len(new_computed_blocks))
        # A hit on a free block leaves the free queue when referenced: it cannot also be new.
        free_hits = sum(1 for b in new_computed_blocks if b.ref_count == 0)
        if need > self.pool.num_free_blocks - free_hits:
            return None
        self.pool.touch(new_computed_blocks)
        new = self.pool.get_new_blocks(need)
        assert new is not None  # checked above
        req.block_table.extend(new_computed_blocks)
        req.block_table.extend(new)
        return new

    def cache_blocks(self, req: KVRequest, num_full: int) -> None:
        """Register the request's first `num_full` blocks (full, computed) in the prefix cache."""
        if not self.pool.enable_caching or num_full <= req.num_cached_blocks:
            return
        bs, start = self.block_size, req.num_cached_blocks
        hashes = req.hashes_upto(num_full, bs)
        parent = hashes[start - 1] if start else None
        self.pool.cache_full_blocks(
            req.block_table[start:num_full],
            hashes[start:],
            req.token_ids[start * bs : num_full * bs],
            parent,
        )
        req.num_cached_blocks = num_full
        if self._write_through:
            self._offer(req.block_table[start:num_full], hashes[start:], req.token_ids[start * bs : num_full * bs], parent)

    def free(self, req: KVRequest) -> None:
        """Give back every block of `req` (finish, abort, preemption, failed load)."""
        blocks, req.block_table = req.block_table, []
        req.num_cached_blocks = 0
        loading = self._loading_of(req)
        if loading is not None:
            loading.abandoned = (loading.abandoned or []) + blocks  # freed when the load ends
            return
        self.pool.free_blocks(blocks)

    # -- transfer leases -----------------------------------------------------------------
    def lend(self, req: KVRequest, num_blocks: int) -> list[int]:
        """Move the request's first `num_blocks` blocks to a lease; they stay referenced."""
        lent, req.block_table = req.block_table[:num_blocks], req.block_table[num_blocks:]
        return [b.block_id for b in lent]

    def take_back(self, block_ids: Sequence[int]) -> None:
        """Free the blocks of a lease that was released or expired."""
        self.pool.free_blocks([self.pool.blocks[i] for i in block_ids])

    # -- external loads ------------------------------------------------------------------
    def start_load(
        self, req: KVRequest, source: bytes, num_tokens: int, skip_blocks: int, loader: KVLoader | None = None
    ) -> None:
        """Phase one: load the KV of `num_tokens` prompt tokens into the request's blocks
        after its first `skip_blocks` (reserved by `allocate_slots`), with `loader` (default:
        the engine's). The outcome, also of a load that could not start, comes from
        `finished_loads()`."""
        loader = loader or self.loader
        bs = self.block_size
        blocks = req.block_table[skip_blocks : -(-num_tokens // bs)]
        load = KVLoad(
            next(self._ids), req.request_id, source, num_tokens, skip_blocks,
            tuple(b.block_id for b in blocks),
        )
        self._loads[load.load_id] = _Loading(req)
        try:
            if loader is None:
                raise RuntimeError("this engine has no KV loader")
            loader.start_load(load)
        except Exception as exc:
            self._done.append(LoadDone(load.load_id, exc))

    def finished_loads(self) -> list[tuple[KVRequest, Exception | None]]:
        """Phase two: the loads that ended since the last call, each once. A failed load's
        blocks are freed here; so are those of a request freed while it loaded (not
        reported: nobody waits for it any more)."""
        done, self._done = self._done, []
        if self.loader is not None:
            done += self.loader.poll_finished()
        if self.tiers is not None:
            done += self.tiers.poll_finished()
            self._reclaim_offloads()
        out: list[tuple[KVRequest, Exception | None]] = []
        for d in done:
            loading = self._loads.pop(d.load_id, None)
            if loading is None:
                log.error("KV load %d reported twice or never started", d.load_id)
                continue
            if loading.abandoned is not None:
                self.pool.free_blocks(loading.abandoned)
                continue
            if d.error is not None:
                self.free(loading.req)
            out.append((loading.req, d.error))
        return out

    def close(self) -> None:
        """Wait for loads in flight and free the blocks of abandoned ones (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self.loader is not None:
            self.loader.close()
        if self.tiers is not None:
            self.tiers.close()
        for req, _ in self.finished_loads():
            self.free(req)
        if self._loads:
            log.error("%d KV loads never reported; their blocks stay held", len(self._loads))

    # -- lower tiers ---------------------------------------------------------------------
    def lookup_tiers(self, req: KVRequest, first_block: int, num_blocks: int) -> int:
        """How many of the request's prompt blocks `first_block`.. (below `num_blocks`) a
        lower tier holds, from the first; 0 without tiers."""
        if self.tiers is None or first_block >= num_blocks:
            return 0
        return self.tiers.lookup(req.hashes_upto(num_blocks, self.block_size)[first_block:])

    def start_tier_load(self, req: KVRequest, num_tokens: int, skip_blocks: int) -> None:
        """Onboard the blocks after `skip_blocks` up to `num_tokens` (a multiple of the block
        size) from the tiers; reported by `finished_loads()` like any load."""
        assert self.tiers is not None
        hashes = req.hashes_upto(num_tokens // self.block_size, self.block_size)[skip_blocks:]
        self.start_load(req, array("Q", hashes).tobytes(), num_tokens, skip_blocks, self.tiers)

    def count_tier_query(self, num_blocks: int) -> None:
        if self.tiers is not None and num_blocks > 0:
            self.tiers.count_query(num_blocks)

    def offer_hits(self, req: KVRequest, hits: Sequence[Block]) -> None:
        """A request reuses these cached blocks (write-through: offered again, which admits
        them to the disk tier and restores them in host memory if it dropped them)."""
        if self._write_through and hits:
            hashes = req.hashes_upto(len(hits), self.block_size)
            self._offer(hits, hashes, req.token_ids[: len(hits) * self.block_size], None)

    def _offer(self, blocks: Sequence[Block], hashes: Sequence[int], token_ids: Sequence[int], parent: int | None) -> None:
        assert self.tiers is not None
        bs, keys = self.block_size, []
        for i, h in enumerate(hashes):
            keys.append(BlockKey(h, parent, tuple(token_ids[i * bs : (i + 1) * bs])))
            parent = h
        self.pool.touch(blocks)
        taken = self.tiers.offer([b.block_id for b in blocks], keys)
        if taken < len(blocks):
            self.pool.free_blocks(blocks[taken:])

    def _offload_evicted(self, block: Block) -> None:
        assert self.tiers is not None and block.block_hash is not None and block.token_ids is not None
        self.tiers.offload_now(block.block_id, BlockKey(block.block_hash, block.parent_hash, block.token_ids))

    def _reclaim_offloads(self) -> None:
        assert self.tiers is not None
        ids = self.tiers.poll_released()
        if ids:
            self.pool.free_blocks([self.pool.blocks[i] for i in ids])

    def _loading_of(self, req: KVRequest) -> _Loading | None:
        for loading in self._loads.values():
            if loading.req is req:
                return loading
        return None
