"""Continuous batching with a per-step token budget, chunked prefill, prefix caching,
preemption by recompute, and KV imports that never stall the batch.

The engine loop thread calls `add`, `remove`, `schedule` and `update` in turn; nothing else
touches a `Scheduler`. The scheduler owns its `KVCacheManager` (which owns the block pool
and every block) and the queues of sequences.

States: WAITING (in `waiting`) -> RUNNING (in `running`) -> FINISHED. A waiting sequence
whose prompt KV comes from a prefill worker first gets its blocks and an external load
started, and waits in `loading` as WAITING_FOR_KV; when the load has finished it goes back to
the front of `waiting` with its whole prompt computed, and decodes from its first token.
A failed load is returned by `schedule()` (blocks already freed) for the engine to fail.
A waiting sequence whose prompt misses the device pool but hits a lower KV tier (host
memory, disk: `kv_manager.tiers`) is onboarded the same way, for the blocks the tiers hold;
it then computes the rest of its prompt like a cache hit.

Each `schedule()` first collects finished loads, then spends `max_num_batched_tokens`:
running sequences first (one token per decoding sequence, the next chunk for a sequence
still prefilling), then waiting ones, whose cached prefix blocks are reused. When blocks run
out, the most recently admitted running sequence is preempted: its blocks are freed and it
goes back to the front of the queue to be recomputed later (cheaply, through the prefix
cache).
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass
from typing import cast

from kv_manager.kv_cache_manager import KVCacheManager
from plugins.torch_engine.sequence import SeqStatus, Sequence

log = logging.getLogger(__name__)

Failed = list[tuple[Sequence, Exception]]


@dataclass(slots=True)
class ScheduledBatch:
    """One step's work: sequences with 1 new token first (decode rows), then prefill chunks."""

    seqs: list[Sequence]
    num_new: list[int]
    num_decode: int


class Scheduler:
    def __init__(self, kv: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.kv = kv
        self.block_size = kv.block_size
        self.max_num_seqs = max_num_seqs
        self.budget = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.loading: list[Sequence] = []  # WAITING_FOR_KV, in load start order
        self.num_preemptions = 0

    # -- queue -----------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        seq.status = SeqStatus.WAITING
        self.waiting.append(seq)

    def has_work(self) -> bool:
        """Also while a load is in flight, even an abandoned one: its blocks come back
        only when `schedule()` sees it finish."""
        return bool(self.waiting or self.running or self.kv.has_loads())

    @property
    def num_waiting(self) -> int:
        return len(self.waiting) + len(self.loading)

    def remove(self, seq: Sequence) -> None:
        """Take a sequence out of the queues and free its blocks (finish or abort). The
        blocks of a sequence waiting for KV are freed when its load has finished."""
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SeqStatus.WAITING:
            self.waiting.remove(seq)
        elif seq.status is SeqStatus.WAITING_FOR_KV:
            self.loading.remove(seq)
        self.kv.free(seq)
        seq.status = SeqStatus.FINISHED

    # -- scheduling ------------------------------------------------------------------
    def schedule(self) -> tuple[ScheduledBatch, Failed]:
        """Pick this step's work. Also returns sequences whose KV load failed."""
        failed = self._collect_loads()
        budget = self.budget
        picked: list[tuple[Sequence, int]] = []
        preempted = False
        queue = list(self.running)
        kept: list[Sequence] = []
        while queue and budget > 0:
            seq = queue.pop(0)
            num_new = min(seq.num_pending, budget)
            if num_new <= 0:
                kept.append(seq)
                continue
            while self.kv.allocate_slots(seq, num_new) is None:
                victim = queue.pop() if queue else seq
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            else:
                picked.append((seq, num_new))
                kept.append(seq)
                budget -= num_new
        self.running = kept + [s for s in queue if s.status is SeqStatus.RUNNING]
        while not preempted and self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if seq.import_pending:
                if not self._start_load(seq):
                    break
                self.waiting.popleft()
                continue
            onboarding = self._onboard(seq)
            if onboarding is None:
                break
            if onboarding:
                self.waiting.popleft()
                continue
            num_new = self._admit(seq, budget)
            if num_new is None:
                break
            self.waiting.popleft()
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            picked.append((seq, num_new))
            budget -= num_new
        picked.sort(key=lambda p: p[1] != 1)
        batch = ScheduledBatch([s for s, _ in picked], [n for _, n in picked], sum(1 for _, n in picked if n == 1))
        return batch, failed

    def update(self, batch: ScheduledBatch) -> None:
        """After the forward pass: advance computed counts and cache newly full blocks."""
        bs = self.block_size
        for seq, n in zip(batch.seqs, batch.num_new, strict=True):
            seq.num_computed += n
            self.kv.cache_blocks(seq, seq.num_computed // bs)

    # -- internals ---------------------------------------------------------------------
    def _admit(self, seq: Sequence, budget: int) -> int | None:
        """Give a waiting sequence its blocks (cached prefix first); the tokens it computes
        this step, or None when the pool is short."""
        if seq.block_table:  # its KV was loaded
            num_new = min(seq.num_pending, budget)
            if self.kv.allocate_slots(seq, num_new) is not None:
                return num_new
            # Wait without holding blocks; the loaded prompt blocks stay in the prefix cache.
            self.kv.free(seq)
            seq.num_computed = 0
            return None
        # Leave at least one token to compute so the step produces logits.
        hits = [] if seq.needs_prompt_logits else self.kv.get_computed_blocks(seq, len(seq.token_ids) - 1)
        computed = len(hits) * self.block_size
        num_new = min(len(seq.token_ids) - computed, budget)
        if self.kv.allocate_slots(seq, num_new, hits) is None:
            return None
        seq.num_computed = computed
        seq.num_cached_blocks = len(hits)
        self.kv.offer_hits(seq, hits)
        self.kv.count_tier_query((len(seq.token_ids) - 1) // self.block_size - len(hits))
        if not seq.admitted_once:
            seq.cached_tokens = min(computed, seq.prompt_len)
            seq.admitted_once = True
        return num_new

    def _onboard(self, seq: Sequence) -> bool | None:
        """Start loading the prompt blocks after the device hits that a lower KV tier holds:
        True when started (the sequence waits for KV), False when there is nothing to load,
        None when the pool is short."""
        if seq.block_table or seq.skip_tiers or self.kv.tiers is None or seq.needs_prompt_logits:
            return False
        bs = self.block_size
        hits = self.kv.get_computed_blocks(seq, len(seq.token_ids) - 1)
        limit = (len(seq.token_ids) - 1) // bs  # leave a token to compute for the logits
        lower = self.kv.lookup_tiers(seq, len(hits), limit)
        if not lower:
            return False
        if self.kv.allocate_slots(seq, 0, hits, num_external_computed_tokens=lower * bs) is None:
            return None
        self.kv.offer_hits(seq, hits)
        self.kv.count_tier_query(limit - len(hits))
        seq.num_cached_blocks = len(hits)
        seq.load_target = (len(hits) + lower) * bs
        seq.status = SeqStatus.WAITING_FOR_KV
        self.loading.append(seq)
        self.kv.start_tier_load(seq, seq.load_target, len(hits))
        return True

    def _start_load(self, seq: Sequence) -> bool:
        """Reserve blocks for the whole prompt (cached prefix blocks count) and start loading
        the rest; False when the pool is short."""
        bs = self.block_size
        hits = self.kv.get_computed_blocks(seq, seq.prompt_len)
        external = seq.prompt_len - len(hits) * bs
        if self.kv.allocate_slots(seq, 0, hits, num_external_computed_tokens=external) is None:
            return False
        seq.num_cached_blocks = len(hits)
        seq.import_pending = False
        seq.load_target = seq.prompt_len
        seq.status = SeqStatus.WAITING_FOR_KV
        self.loading.append(seq)
        source = seq.request.kv_descriptor
        self.kv.start_load(seq, source or b"", seq.prompt_len, len(hits))
        return True

    def _collect_loads(self) -> Failed:
        """Finished loads rejoin the front of `waiting` with what they loaded computed. A
        failed onboarding from a tier is not an error: the sequence recomputes instead."""
        failed: Failed = []
        ready: list[Sequence] = []
        for req, error in self.kv.finished_loads():
            seq = cast(Sequence, req)
            self.loading.remove(seq)
            if error is not None and seq.request.kv_descriptor is None:
                log.warning("request_id=%s: onboarding from a KV tier failed (%s); recomputing", seq.request_id, error)
                seq.skip_tiers = True
                seq.num_computed = 0
                seq.status = SeqStatus.WAITING
                ready.append(seq)
                continue
            if error is not None:
                seq.status = SeqStatus.FINISHED
                failed.append((seq, error))
                continue
            seq.num_computed = seq.load_target
            if not seq.admitted_once:
                seq.cached_tokens = min(seq.load_target, seq.prompt_len)
                seq.admitted_once = True
            # Registered now, so that the prompt survives if the sequence must wait.
            self.kv.cache_blocks(seq, seq.load_target // self.block_size)
            seq.status = SeqStatus.WAITING
            ready.append(seq)
        self.waiting.extendleft(reversed(ready))
        return failed

    def _preempt(self, seq: Sequence) -> None:
        self.kv.free(seq)
        seq.num_computed = 0
        seq.status = SeqStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
