"""`KvRouter`: the routing decision the `router` model makes for every request.

One decision, in three timed phases:

1. hashing: the prompt's full blocks -> chained block hashes (`kv_manager.hashing`), unless
   the caller passes hashes it already has;
2. lookup: `KvIndex.find_weighted_matches` -> how many leading blocks each live worker holds,
   in any tier, and those blocks weighed by the best tier holding each (device 1, host
   memory `host_tier_weight`, disk `disk_tier_weight`);
3. schedule: the policy (`router_ensemble.routing.policies`) picks a worker from those weighed
   overlaps and each worker's load (`LoadTable`: last load report + the router's pending
   assignments); the choice is recorded as a pending assignment (and, in approximate mode, as
   assumed cached).

Workers enter with `add_worker` (the orchestration, or the subscriber when a worker first
reports) and leave with `remove_worker` (the subscriber on "leave" or silence, the
orchestration on unload): their index entries and load go with them, so later requests go
elsewhere. `decide` never waits on the network.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import repeat

from kv_manager.events import KVEvent
from kv_manager.hashing import hash_blocks
from kv_manager.wire import LoadReport
from router_ensemble.orchestration.ports import Selection
from router_ensemble.routing.config import RoutingConfig
from router_ensemble.routing.directory import WorkerDirectory
from router_ensemble.routing.index import KvIndex
from router_ensemble.routing.load import LoadTable
from router_ensemble.routing.metrics import RoutingMetrics
from router_ensemble.routing.policies import Candidate, make_policy
from trident.core.errors import ValidationError, WorkerUnavailable

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Decision:
    """Where a request goes and what the router expects it to find cached there."""

    worker_id: str
    overlap_blocks: int  # leading prompt blocks the worker holds, in any tier
    cached_tokens: int  # overlap_blocks * block_size, at most prompt_tokens
    prompt_tokens: int
    block_hashes: tuple[int, ...]
    overlaps: Mapping[str, int] = field(default_factory=dict)  # every candidate's overlap
    weighted_overlap: float = 0.0  # overlap_blocks weighed by tier (= it when all on device)
    hashing_us: float = 0.0
    lookup_us: float = 0.0
    schedule_us: float = 0.0

    @property
    def prompt_blocks(self) -> int:
        return len(self.block_hashes)

    @property
    def uncached_tokens(self) -> int:
        return self.prompt_tokens - self.cached_tokens

    @property
    def total_us(self) -> float:
        return self.hashing_us + self.lookup_us + self.schedule_us


class KvRouter:
    """KV-aware worker selection for one pool of workers (e.g. the decode pool).

    Who calls it: the `router` model's request threads call `decide` (thread-safe, never
    blocks on I/O); the subscriber thread calls `apply_events`, `clear_worker`, `update_load`,
    `add_worker` and `remove_worker`; the orchestration may call `add_worker` /
    `remove_worker` too. The router owns no blocks: it only keeps the workers' block hashes.
    """

    def __init__(
        self, config: RoutingConfig | None = None, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.config = (config or RoutingConfig()).validate()
        cfg = self.config
        self.block_size = cfg.block_size
        self.approximate = not cfg.kv_events
        self.index = KvIndex(
            approximate=self.approximate,
            ttl_s=cfg.approx_ttl_s,
            clock=clock,
            host_tier_weight=cfg.host_tier_weight,
            disk_tier_weight=cfg.disk_tier_weight,
        )
        self.loads = LoadTable(
            block_size=cfg.block_size,
            grace_s=cfg.pending_grace_s,
            max_age_s=cfg.pending_max_age_s,
            clock=clock,
        )
        self.metrics = RoutingMetrics()
        self.policy = make_policy(
            cfg.policy,
            overlap_weight=cfg.overlap_weight,
            temperature=cfg.temperature,
            seed=cfg.rng_seed,
        )
        self._lock = threading.Lock()
        self._workers: dict[str, None] = {}  # insertion-ordered set
        self._down: set[str] = set()  # removed (left, silent, unloaded) until added again
        self._removals: dict[str, int] = {}  # worker -> times removed (in-flight watchers)
        self._sched_lock = threading.Lock()

    # ------------------------------------------------------------ membership and feeds

    def add_worker(self, worker_id: str) -> None:
        with self._lock:
            new = worker_id not in self._workers
            self._workers[worker_id] = None
            self._down.discard(worker_id)
        if new:
            logger.info("router: worker=%s added", worker_id)

    def remove_worker(self, worker_id: str) -> None:
        with self._lock:
            known = worker_id in self._workers
            self._workers.pop(worker_id, None)
            self._down.add(worker_id)
            self._removals[worker_id] = self._removals.get(worker_id, 0) + 1
        blocks = self.index.remove_worker(worker_id)
        self.loads.remove(worker_id)
        if known:
            logger.info(
                "router: worker=%s removed (%d blocks dropped from the index)", worker_id, blocks
            )

    def workers(self) -> list[str]:
        with self._lock:
            return list(self._workers)

    def removals(self, worker_id: str) -> int:
        """How often the worker was removed so far: a change during a request means the
        worker went away (left, went silent, was unloaded) while the request ran."""
        with self._lock:
            return self._removals.get(worker_id, 0)

    def is_down(self, worker_id: str) -> bool:
        with self._lock:
            return worker_id in self._down

    def apply_events(self, worker_id: str, events: Iterable[KVEvent]) -> None:
        self.index.apply_events(worker_id, events)

    def clear_worker(self, worker_id: str) -> None:
        self.index.clear_worker(worker_id)

    def update_load(self, worker_id: str, report: LoadReport) -> None:
        self.loads.update(worker_id, report)

    def release(self, request_id: str) -> None:
        """The request finished: its pending load no longer counts (if a report had not
        already absorbed it)."""
        self.loads.release(request_id)

    def record_served(self, worker_id: str, prompt_tokens: int, cached_tokens: int) -> None:
        self.metrics.record_served(worker_id, prompt_tokens, cached_tokens)

    # ------------------------------------------------------------ the decision

    def decide(
        self,
        token_ids: Sequence[int] | None = None,
        candidates: Iterable[str] | None = None,
        *,
        block_hashes: Sequence[int] | None = None,
        request_id: str | None = None,
    ) -> Decision:
        """Pick a worker for a prompt given as token ids or as its chained block hashes.

        `candidates` limits the choice (e.g. the workers the orchestration considers ready;
        default: every added worker); candidates the router has removed (they left or went
        silent) are skipped. `request_id` lets `release` end the request's pending load early.
        Raises `WorkerUnavailable` when no worker is left, `ValidationError("input_ids")` for
        bad tokens.
        """
        t0 = time.perf_counter()
        if block_hashes is None:
            if token_ids is None:
                raise ValidationError("input_ids", "give token ids or block hashes")
            try:
                hashes = tuple(hash_blocks(token_ids, self.block_size))
            except (TypeError, OverflowError):
                raise ValidationError(
                    "input_ids", "must be a sequence of non-negative 32-bit integers"
                ) from None
            prompt_tokens = len(token_ids)
        else:
            hashes = tuple(block_hashes)
            prompt_tokens = (
                len(token_ids) if token_ids is not None else len(hashes) * self.block_size
            )
        t1 = time.perf_counter()

        with self._lock:
            if candidates is None:
                pool = list(self._workers)
            else:
                pool = [w for w in candidates if w not in self._down]
        if not pool:
            raise WorkerUnavailable(
                "no live worker to route to"
                + ("" if candidates is None else f" among {sorted(set(candidates))}")
            )
        overlaps, weighted = self.index.find_weighted_matches(hashes, pool)
        t2 = time.perf_counter()

        request_blocks = -(-prompt_tokens // self.block_size)
        with self._sched_lock:
            zeros = repeat(0)  # maps, not a comprehension: this runs for every request
            options = list(
                map(
                    Candidate,
                    pool,
                    map(overlaps.get, pool, zeros),
                    self.loads.views(pool),
                    map(weighted.get, pool, zeros),
                )
            )
            chosen = self.policy.select(options, request_blocks)
            # cached blocks are shared (a lower-tier one in part); whole blocks keep the
            # pending sums exact
            new_blocks = round(request_blocks - chosen.hit_blocks)
            self.loads.assign(chosen.worker_id, new_blocks, new_blocks, request_id)
        if self.approximate:
            self.index.assume_cached(chosen.worker_id, hashes)
        t3 = time.perf_counter()

        decision = Decision(
            worker_id=chosen.worker_id,
            overlap_blocks=chosen.overlap_blocks,
            cached_tokens=min(chosen.overlap_blocks * self.block_size, prompt_tokens),
            prompt_tokens=prompt_tokens,
            block_hashes=hashes,
            overlaps={c.worker_id: c.overlap_blocks for c in options},
            weighted_overlap=chosen.hit_blocks,
            hashing_us=(t1 - t0) * 1e6,
            lookup_us=(t2 - t1) * 1e6,
            schedule_us=(t3 - t2) * 1e6,
        )
        self.metrics.record_decision(
            chosen.worker_id,
            len(hashes),
            chosen.overlap_blocks,
            decision.hashing_us,
            decision.lookup_us,
            decision.schedule_us,
            decision.weighted_overlap,
        )
        return decision


class KvSelector:
    """`KvRouter` behind the orchestration's `WorkerSelector` port, for one pool.

    Candidates are the directory's ready workers (re-probed at once when it knows none,
    e.g. right after start) minus `exclude` and minus those the router removed (they left
    or went silent). `on_workers` sees the ready list before each decision (the router
    model keeps its event subscriptions in line with it); `on_decision` sees every
    `Decision` (metrics). Called on request threads.
    """

    def __init__(
        self,
        router: KvRouter,
        directory: WorkerDirectory,
        *,
        on_workers: Callable[[tuple[str, ...]], None] | None = None,
        on_decision: Callable[[Decision], None] | None = None,
    ) -> None:
        self.router = router
        self.directory = directory
        self.on_workers = on_workers
        self.on_decision = on_decision

    def ready(self) -> tuple[str, ...]:
        ready = self.directory.workers()
        if not ready:
            self.directory.invalidate()
            ready = self.directory.workers()
        if self.on_workers is not None:
            self.on_workers(ready)
        return ready

    def select(self, request_id: str, token_ids: Sequence[int], exclude: Collection[str] = ()) -> Selection:
        """The chosen worker and the prompt tokens the router expects it to hold cached
        (`orchestration.disagg` counts the rest as prefill work)."""
        ready = self.ready()
        candidates = [w for w in self.directory.selectable(ready) if w not in exclude]
        if not candidates:
            why = "free" if ready else "ready"
            raise WorkerUnavailable(f"no {self.directory.pool} worker is {why}")
        decision = self.router.decide(token_ids, candidates, request_id=request_id)
        if self.on_decision is not None:
            self.on_decision(decision)
        return Selection(decision.worker_id, decision.cached_tokens)

    def release(self, request_id: str) -> None:
        self.router.release(request_id)

    def record_served(self, worker: str, prompt_tokens: int, cached_tokens: int) -> None:
        """The engine's own count of prompt tokens served from its cache, for the hit rate."""
        self.router.record_served(worker, prompt_tokens, cached_tokens)

    def is_gone(self, worker: str) -> bool:
        return self.directory.is_gone(worker)
