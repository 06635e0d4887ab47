"""The tiered cache under a KVCacheManager (`kv_manager.tiers.cache`), on a tiny tensor pool:
write-through and offload-on-eviction, the references held while a copy is in flight,
onboarding into reserved blocks, a full disk and a corrupt file."""

from __future__ import annotations

import time

import pytest
import torch

from kv_manager.block_pool import BlockPool
from kv_manager.kv_cache_manager import KVCacheManager
from kv_manager.layout import KVLayout
from kv_manager.tiers import DiskTier, HostTier
from kv_manager.tiers.cache import TieredCache
from tests.kv_manager.test_kv_cache_manager import Req

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=4, block_size=4, dtype="float32", model_id="tiny")
NUM_BLOCKS = 6


def _manager(tiers, offload="write_through"):
    tensor = torch.zeros(LAYOUT.pool_shape(NUM_BLOCKS))
    cache = TieredCache(tiers, tensor)
    return KVCacheManager(BlockPool(NUM_BLOCKS, LAYOUT.block_size), None, cache, offload), tensor


def _computed(kv, tensor, rid, tokens):
    """Compute a request: blocks allocated, filled with the first token of each, cached."""
    req = Req(rid, tokens)
    assert kv.allocate_slots(req, len(tokens)) is not None
    for i, b in enumerate(req.block_table):
        tensor[b.block_id] = float(tokens[i * 4])
    req.num_computed = len(tokens)
    kv.cache_blocks(req, len(tokens) // 4)
    return req


def _settle(kv, timeout=10.0):
    deadline = time.monotonic() + timeout
    while kv.has_loads() and time.monotonic() < deadline:
        kv.finished_loads()
        time.sleep(0.005)
    assert not kv.has_loads()


def _finished(kv, timeout=10.0):
    """The first non-empty `finished_loads()`."""
    deadline, out = time.monotonic() + timeout, []
    while not out and time.monotonic() < deadline:
        out = kv.finished_loads()
        time.sleep(0.005)
    return out


def test_write_through_holds_a_reference_until_copied():
    host = HostTier(LAYOUT, 8)
    kv, tensor = _manager([host])
    req = _computed(kv, tensor, "a", list(range(100, 108)))  # 2 full blocks
    kv.free(req)
    _settle(kv)
    assert kv.pool.num_used_blocks == 0  # the offload's references are gone too
    assert set(host.held()) == set(req.hashes_upto(2, 4))
    assert [e.medium for e in kv.take_events() if hasattr(e, "medium")] == ["GPU", "CPU"]
    stats = kv.tiers.counters()[0]
    assert (stats.medium, stats.offloaded, stats.bytes_offloaded) == ("CPU", 2, 2 * LAYOUT.block_nbytes)


def test_evict_mode_copies_only_what_the_pool_evicts():
    host = HostTier(LAYOUT, 8)
    kv, tensor = _manager([host], offload="evict")
    a = _computed(kv, tensor, "a", list(range(100, 108)))
    kv.free(a)
    assert host.held() == []  # nothing copied while the device pool keeps it
    b = _computed(kv, tensor, "b", list(range(200, 220)))  # 5 of 6 blocks: one of a's goes
    kv.free(b)
    evicted = [h for h in a.hashes_upto(2, 4) if h not in kv.pool.cached]
    assert evicted and host.held() == evicted


def test_onboarding_fills_reserved_blocks_and_the_request_reads_them():
    host = HostTier(LAYOUT, 8)
    kv, tensor = _manager([host])
    tokens = list(range(100, 116))  # 4 full blocks
    a = _computed(kv, tensor, "a", tokens)
    kv.free(a)
    _settle(kv)
    kv.pool.reset_prefix_cache()  # the device pool forgets it
    tensor.zero_()
    again = Req("a2", tokens + [1])
    assert kv.get_computed_blocks(again, 16) == []
    assert kv.lookup_tiers(again, 0, 4) == 4
    assert kv.allocate_slots(again, 0, [], num_external_computed_tokens=16) is not None
    kv.start_tier_load(again, 16, 0)
    [(req, error)] = _finished(kv)
    assert req is again and error is None
    assert [tensor[b.block_id, 0, 0, 0, 0, 0].item() for b in again.block_table] == [100.0, 104.0, 108.0, 112.0]
    assert host.num_held == 4 and not host._pins  # unpinned after the load


def test_full_disk_means_no_offload_not_errors(tmp_path, monkeypatch):
    disk = DiskTier(LAYOUT, tmp_path, 1 << 20, admit_after=1)

    def enospc(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("kv_manager.tiers.disk.os.open", enospc)
    kv, tensor = _manager([disk])
    kv.free(_computed(kv, tensor, "a", list(range(100, 108))))
    _settle(kv)
    stats = kv.tiers.counters()[0]
    assert (stats.offloaded, stats.failed, disk.num_held) == (0, 1, 0)
    assert kv.pool.num_used_blocks == 0
    assert list(tmp_path.rglob("*.tmp")) == []


def test_corrupt_block_file_fails_the_load_and_is_dropped(tmp_path):
    disk = DiskTier(LAYOUT, tmp_path, 1 << 20, admit_after=1)
    kv, tensor = _manager([disk])
    tokens = list(range(100, 108))
    kv.free(_computed(kv, tensor, "a", tokens))
    _settle(kv)
    kv.pool.reset_prefix_cache()
    victim = sorted(disk.dir.glob("*.kvb"))[0]
    raw = bytearray(victim.read_bytes())
    raw[-1] ^= 0xFF
    victim.write_bytes(bytes(raw))
    again = Req("a2", tokens + [1])
    assert kv.lookup_tiers(again, 0, 2) == 2
    assert kv.allocate_slots(again, 0, [], num_external_computed_tokens=8) is not None
    kv.start_tier_load(again, 8, 0)
    [(req, error)] = _finished(kv)
    assert req is again and "checksum" in str(error)
    assert again.block_table == [] and kv.pool.num_used_blocks == 0  # freed for recompute
    assert disk.num_held == 1 and not victim.exists()
    assert kv.tiers.counters()[0].failed == 1


@pytest.mark.parametrize("offload", ["write_through", "evict"])
def test_close_waits_for_copies_and_drops_references(offload):
    kv, tensor = _manager([HostTier(LAYOUT, 8)], offload)
    kv.free(_computed(kv, tensor, "a", list(range(100, 116))))
    kv.close()
    assert kv.pool.num_used_blocks == 0
