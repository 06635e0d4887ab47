"""Scheduler behaviour on a block pool alone (no model): exact block ids, chunking,
preemption and freeing."""

from __future__ import annotations

from kv_manager.block_pool import BlockPool
from plugins.torch_engine.sampler import make_state
from plugins.torch_engine.scheduler import Scheduler
from plugins.torch_engine.sequence import SeqStatus, Sequence
from trident.core.types import GenerateRequest, SamplingParams


def _seq(rid: str, prompt: list[int]) -> Sequence:
    req = GenerateRequest(rid, tuple(prompt), SamplingParams(max_tokens=8, temperature=0))
    return Sequence(req, lambda c: None, make_state(req.sampling, (2,)), list(prompt), len(prompt))


def _ids(seq: Sequence) -> list[int]:
    return [b.block_id for b in seq.block_table]


def test_admission_assigns_exact_blocks_and_budget_chunks_prefill():
    sched = Scheduler(BlockPool(8, 4), max_num_seqs=4, max_num_batched_tokens=8)
    a, b = _seq("a", list(range(10, 16))), _seq("b", list(range(20, 25)))
    sched.add(a)
    sched.add(b)
    batch, failed = sched.schedule()
    assert not failed
    assert batch.num_new == [6, 2]  # b gets the rest of the 8-token budget
    assert _ids(a) == [0, 1] and _ids(b) == [2]
    sched.update(batch)
    a.token_ids.append(99)  # a finished its prompt and sampled; b is mid-prefill
    batch, _ = sched.schedule()
    assert [s.request_id for s in batch.seqs] == ["a", "b"] and batch.num_new == [1, 3]
    assert batch.num_decode == 1
    sched.update(batch)
    assert _ids(a) == [0, 1] and _ids(b) == [2, 3]


def test_prefix_hit_reuses_cached_blocks_but_computes_last_token():
    pool = BlockPool(8, 4)
    sched = Scheduler(pool, 4, 64)
    first = _seq("a", list(range(100, 108)))  # two full blocks
    sched.add(first)
    batch, _ = sched.schedule()
    sched.update(batch)
    sched.remove(first)
    again = _seq("b", list(range(100, 108)))
    sched.add(again)
    batch, _ = sched.schedule()
    # Block 0 is a hit; block 1 would cover the last token, which must be recomputed.
    assert again.cached_tokens == 4 and batch.num_new == [4]
    assert _ids(again)[0] == 0


def test_preemption_frees_the_newest_and_everything_is_freed_at_the_end():
    pool = BlockPool(3, 4)
    sched = Scheduler(pool, 4, 64)
    a, b = _seq("a", list(range(4))), _seq("b", list(range(50, 54)))
    sched.add(a)
    sched.add(b)
    batch, _ = sched.schedule()
    sched.update(batch)
    for s in (a, b):  # each sampled a token: 5 tokens now need 2 blocks each
        s.token_ids.append(7)
    batch, _ = sched.schedule()
    assert sched.num_preemptions == 1 and b.status is SeqStatus.WAITING and b.block_table == []
    assert [s.request_id for s in batch.seqs] == ["a"]
    sched.update(batch)
    sched.remove(a)
    batch, _ = sched.schedule()  # b comes back and recomputes (its first block is cached)
    assert batch.seqs == [b] and b.cached_tokens == 0
    sched.update(batch)
    sched.remove(b)
    assert pool.num_used_blocks == 0
