"""Continuous batching with a per-step token budget, chunked prefill, prefix caching and
preemption by recompute.

The engine loop thread calls `add`, `abort`, `schedule` and `update` in turn; nothing else
touches a `Scheduler`. The scheduler owns the `BlockPool` and every sequence's block table.

Each `schedule()` spends `max_num_batched_tokens`: running sequences first (one token per
decoding sequence, the next chunk for a sequence still prefilling), then waiting ones, whose
cached prefix blocks are reused. When blocks run out, the most recently admitted running
sequence is preempted: its blocks are freed and it goes back to the front of the queue to
be recomputed later (cheaply, through the prefix cache).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from kv_manager.block_pool import Block, BlockPool
from plugins.torch_engine.sequence import SeqStatus, Sequence

# Pulls a sequence's prompt KV from a prefill worker into `blocks` (the prompt blocks after
# the first `skip` ones). Raises on failure.
ImportFn = Callable[[Sequence, int, list[Block]], None]


@dataclass(slots=True)
class ScheduledBatch:
    """One step's work: sequences with 1 new token first (decode rows), then prefill chunks."""

    seqs: list[Sequence]
    num_new: list[int]
    num_decode: int


class Scheduler:
    def __init__(
        self,
        pool: BlockPool,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        import_fn: ImportFn | None = None,
    ) -> None:
        self.pool = pool
        self.block_size = pool.block_size
        self.max_num_seqs = max_num_seqs
        self.budget = max_num_batched_tokens
        self.import_fn = import_fn
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    # -- queue -----------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        seq.status = SeqStatus.WAITING
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, seq: Sequence) -> None:
        """Take a sequence out of the queues and free its blocks (finish or abort)."""
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SeqStatus.WAITING:
            self.waiting.remove(seq)
        self.free(seq)
        seq.status = SeqStatus.FINISHED

    def free(self, seq: Sequence) -> None:
        self.pool.free_blocks(seq.block_table)
        seq.block_table = []
        seq.num_cached_blocks = 0

    # -- scheduling ------------------------------------------------------------------
    def schedule(self) -> tuple[ScheduledBatch, list[tuple[Sequence, Exception]]]:
        """Pick this step's work. Also returns sequences whose KV import failed."""
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
            while not self._allocate(seq, num_new):
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
        failed: list[tuple[Sequence, Exception]] = []
        while not preempted and self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            try:
                admitted = self._admit(seq)
            except Exception as exc:  # a failed KV import fails this request only
                self.waiting.popleft()
                self.free(seq)
                seq.status = SeqStatus.FINISHED
                failed.append((seq, exc))
                continue
            if not admitted:
                break
            num_new = min(seq.num_pending, budget)
            if not self._allocate(seq, num_new):
                self.free(seq)
                seq.num_computed = 0
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
            self.cache_blocks(seq, seq.num_computed // bs)

    def cache_blocks(self, seq: Sequence, num_full: int) -> None:
        if not self.pool.enable_caching or num_full <= seq.num_cached_blocks:
            return
        bs, start = self.block_size, seq.num_cached_blocks
        hashes = seq.hashes_upto(num_full, bs)
        parent = hashes[start - 1] if start else None
        self.pool.cache_full_blocks(
            seq.block_table[start:num_full], hashes[start:], seq.token_ids[start * bs : num_full * bs], parent
        )
        seq.num_cached_blocks = num_full

    # -- internals ---------------------------------------------------------------------
    def _admit(self, seq: Sequence) -> bool:
        """Attach cached prefix blocks (and imported KV) to a waiting sequence."""
        if seq.block_table:
            return True
        bs = self.block_size
        # Leave at least one token to compute so the step produces logits; an imported
        # prompt is complete up to the first token the prefill worker sampled.
        limit = seq.prompt_len if seq.import_pending else len(seq.token_ids) - 1
        hits = self._match_prefix(seq, limit // bs)
        computed = len(hits) * bs
        if seq.import_pending:
            need = -(-seq.prompt_len // bs) - len(hits)
            new = self.pool.get_new_blocks(need)
            if new is None:
                self.pool.free_blocks(hits)
                return False
            seq.block_table = hits + new
            seq.import_pending = False
            if self.import_fn is None:
                raise RuntimeError("this engine has no KV importer")
            self.import_fn(seq, len(hits), new)
            computed = seq.prompt_len
        else:
            seq.block_table = hits
        seq.num_computed = computed
        seq.num_cached_blocks = min(len(hits), computed // bs)
        if not seq.admitted_once:
            seq.cached_tokens = min(computed, seq.prompt_len)
            seq.admitted_once = True
        return True

    def _match_prefix(self, seq: Sequence, max_blocks: int) -> list[Block]:
        if not self.pool.enable_caching or max_blocks <= 0:
            return []
        bs, hits = self.block_size, []
        for i, h in enumerate(seq.hashes_upto(max_blocks, bs)):
            block = self.pool.get_cached_block(h, seq.token_ids[i * bs : (i + 1) * bs])
            if block is None:
                break
            hits.append(block)
        self.pool.touch(hits)
        return hits

    def _allocate(self, seq: Sequence, num_new: int) -> bool:
        need = -(-(seq.num_computed + num_new) // self.block_size) - len(seq.block_table)
        if need <= 0:
            return True
        blocks = self.pool.get_new_blocks(need)
        if blocks is None:
            return False
        seq.block_table.extend(blocks)
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.free(seq)
        seq.num_computed = 0
        seq.status = SeqStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
