"""Scheduler behaviour on a block pool alone (no model): exact block ids, chunking,
preemption, freeing, and KV imports that load in the background while the batch runs."""

from __future__ import annotations

import threading

import pytest

from kv_manager.block_pool import BlockPool
from kv_manager.kv_cache_manager import KVCacheManager, KVLoad, ThreadedKVLoader
from plugins.torch_engine.sampler import make_state
from plugins.torch_engine.scheduler import Scheduler
from plugins.torch_engine.sequence import SeqStatus, Sequence
from trident.core.errors import ValidationError
from trident.core.types import GenerateRequest, SamplingParams


def _seq(rid: str, prompt: list[int]) -> Sequence:
    req = GenerateRequest(rid, tuple(prompt), SamplingParams(max_tokens=8, temperature=0))
    return Sequence(req, lambda c: None, make_state(req.sampling, (2,)), list(prompt), len(prompt))


def _ids(seq: Sequence) -> list[int]:
    return [b.block_id for b in seq.block_table]


def test_admission_assigns_exact_blocks_and_budget_chunks_prefill():
    sched = Scheduler(KVCacheManager(BlockPool(8, 4)), max_num_seqs=4, max_num_batched_tokens=8)
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
    sched = Scheduler(KVCacheManager(pool), 4, 64)
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
    sched = Scheduler(KVCacheManager(pool), 4, 64)
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


# -- KV imports: the load runs on the loader's thread while the batch keeps stepping --------
class GatedPull:
    """A deliberately slow peer: each load blocks until the test opens `gate`."""

    def __init__(self, error: Exception | None = None) -> None:
        self.gate = threading.Event()
        self.reported = threading.Event()  # set by the loader after a load has been recorded
        self.started = threading.Event()
        self.loads: list[KVLoad] = []
        self.error = error

    def __call__(self, load: KVLoad) -> None:
        self.loads.append(load)
        self.started.set()
        if not self.gate.wait(10):
            raise TimeoutError("the test never opened the gate")
        if self.error is not None:
            raise self.error


@pytest.fixture
def pull():
    return GatedPull()


@pytest.fixture
def loader(pull):
    loader = ThreadedKVLoader(pull, on_done=pull.reported.set)
    yield loader
    pull.gate.set()
    loader.close()


def _imported(rid: str, prompt: list[int], first: int) -> Sequence:
    """A decode-side request continuing a prefill worker's: prompt KV to import, first token known."""
    req = GenerateRequest(rid, tuple(prompt), SamplingParams(max_tokens=8, temperature=0), kv_descriptor=b"peer", first_token=first)
    seq = Sequence(req, lambda c: None, make_state(req.sampling, (2,)), [*prompt, first], len(prompt))
    seq.import_pending = True
    seq.num_outputs = seq.num_emitted = 1
    return seq


def test_running_sequences_keep_decoding_while_an_import_is_in_flight(pull, loader):
    pool = BlockPool(8, 4)
    sched = Scheduler(KVCacheManager(pool, loader), max_num_seqs=4, max_num_batched_tokens=8)
    a = _seq("a", list(range(10, 16)))
    sched.add(a)
    batch, _ = sched.schedule()
    sched.update(batch)
    a.token_ids.append(99)
    b = _imported("b", list(range(20, 25)), 30)
    sched.add(b)
    batch, failed = sched.schedule()
    assert batch.seqs == [a] and batch.num_new == [1] and not failed
    assert b.status is SeqStatus.WAITING_FOR_KV and _ids(b) == [2, 3]  # ceil(5 / 4) blocks
    assert sched.num_waiting == 1 and sched.running == [a]
    assert pull.started.wait(5)
    assert pull.loads == [KVLoad(0, "b", b"peer", 5, 0, (2, 3))]
    for step in range(3):  # the pull is still in flight: a decodes step after step
        sched.update(batch)
        a.token_ids.append(100 + step)
        batch, failed = sched.schedule()
        assert batch.seqs == [a] and batch.num_new == [1] and not failed
        assert b.status is SeqStatus.WAITING_FOR_KV
    assert _ids(a) == [0, 1, 4]  # a's tenth token took a new block; b's stayed reserved
    pull.gate.set()
    assert pull.reported.wait(5)
    sched.update(batch)
    a.token_ids.append(200)
    batch, failed = sched.schedule()
    # b joins the batch with its whole prompt computed and decodes its first token.
    assert batch.seqs == [a, b] and batch.num_new == [1, 1] and batch.num_decode == 2 and not failed
    assert b.status is SeqStatus.RUNNING and b.num_computed == 5 and b.cached_tokens == 5
    assert _ids(b) == [2, 3] and b.num_cached_blocks == 1  # its full prompt block is cached
    assert sched.num_waiting == 0
    sched.update(batch)
    sched.remove(a)
    sched.remove(b)
    assert pool.num_used_blocks == 0 and not sched.has_work()


def test_import_skips_blocks_found_in_the_prefix_cache(pull, loader):
    pool = BlockPool(8, 4)
    sched = Scheduler(KVCacheManager(pool, loader), 4, 64)
    first = _seq("a", list(range(20, 28)))  # caches blocks 0 and 1
    sched.add(first)
    batch, _ = sched.schedule()
    sched.update(batch)
    sched.remove(first)
    b = _imported("b", list(range(20, 25)), 30)
    sched.add(b)
    sched.schedule()
    assert _ids(b) == [0, 2]  # block 0 is a hit; free queue was [2, ..., 7, 1, 0]
    assert pull.started.wait(5)
    assert pull.loads == [KVLoad(0, "b", b"peer", 5, 1, (2,))]
    pull.gate.set()
    assert pull.reported.wait(5)
    batch, _ = sched.schedule()
    assert batch.seqs == [b] and batch.num_new == [1]


def test_failed_import_frees_its_blocks_and_is_returned():
    pull = GatedPull(ValidationError("kv_descriptor", "covers 9 tokens, the prompt has 5"))
    loader = ThreadedKVLoader(pull, on_done=pull.reported.set)
    pool = BlockPool(8, 4)
    sched = Scheduler(KVCacheManager(pool, loader), 4, 64)
    b = _imported("b", list(range(20, 25)), 30)
    sched.add(b)
    batch, failed = sched.schedule()
    assert not batch.seqs and not failed and _ids(b) == [0, 1] and pool.num_used_blocks == 2
    pull.gate.set()
    assert pull.reported.wait(5)
    batch, failed = sched.schedule()
    assert not batch.seqs and failed == [(b, pull.error)]
    assert b.status is SeqStatus.FINISHED and b.block_table == [] and pool.num_used_blocks == 0
    assert pool.free_queue.block_ids()[:2] == [0, 1]  # unhashed: reused first
    sched.remove(b)  # what the engine does next: nothing left to free
    assert pool.num_used_blocks == 0 and not sched.has_work()
    loader.close()


def test_scheduler_without_a_loader_fails_the_import_not_the_step():
    pool = BlockPool(8, 4)
    sched = Scheduler(KVCacheManager(pool), 4, 64)
    b, c = _imported("b", list(range(20, 25)), 30), _seq("c", [1, 2, 3])
    sched.add(b)
    sched.add(c)
    batch, failed = sched.schedule()
    assert batch.seqs == [c] and _ids(c) == [2]
    batch, failed = sched.schedule()
    assert [s for s, _ in failed] == [b] and "no KV loader" in str(failed[0][1])
    assert pool.num_used_blocks == 1


def test_abort_during_import_frees_the_blocks_once_after_the_load_finishes(pull, loader):
    pool = BlockPool(4, 4)
    sched = Scheduler(KVCacheManager(pool, loader), 4, 64)
    b = _imported("b", list(range(20, 25)), 30)
    sched.add(b)
    sched.schedule()
    assert pull.started.wait(5) and _ids(b) == [0, 1]
    sched.remove(b)  # aborted while the copy may still write into blocks 0 and 1
    assert b.status is SeqStatus.FINISHED and b.block_table == []
    assert pool.num_used_blocks == 2 and sched.num_waiting == 0 and sched.has_work()
    c, d = _seq("c", list(range(40, 47))), _seq("d", [5, 6, 7, 8])
    sched.add(c)
    sched.add(d)
    batch, _ = sched.schedule()
    assert batch.seqs == [c] and _ids(c) == [2, 3]
    assert d.status is SeqStatus.WAITING and d.block_table == []  # 0 and 1 are not reusable yet
    sched.update(batch)
    pull.gate.set()
    assert pull.reported.wait(5)
    batch, failed = sched.schedule()  # the load is done: b's blocks come back, d gets one
    assert not failed and batch.seqs == [d] and _ids(d) == [0]
    assert pool.free_queue.block_ids() == [1]
    sched.update(batch)
    batch, failed = sched.schedule()
    assert not failed and not batch.seqs
    sched.remove(c)
    sched.remove(d)  # a second free of 0 or 1 would raise; a leak would show as used blocks
    assert pool.num_used_blocks == 0 and not sched.has_work()
