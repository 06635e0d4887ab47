"""Host and disk KV tiers (`kv_manager.tiers`): contents and eviction order, disk admission by
reuse, the two-phase contract under failure, restart, fingerprint refusal, corrupt files."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from kv_manager.events import BlockRemoved, BlockStored
from kv_manager.hashing import hash_block_tokens
from kv_manager.layout import KVLayout
from kv_manager.tiers import BlockKey, DiskTier, HostTier, TierError

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=4, block_size=4, dtype="float32", model_id="tiny")


def chain(n: int, start: int = 0) -> list[BlockKey]:
    keys, parent = [], None
    for i in range(n):
        tokens = tuple(range(start + 4 * i, start + 4 * i + 4))
        h = hash_block_tokens(parent, tokens)
        keys.append(BlockKey(h, parent, tokens))
        parent = h
    return keys


def block(value: float) -> torch.Tensor:
    return torch.full(LAYOUT.block_shape, value)


def store(tier, keys: list[BlockKey], values: list[float] | None = None) -> list[BlockKey]:
    job = tier.prepare_store(keys)
    for i, key in enumerate(job.keys):
        tier.write(job, i, block(values[keys.index(key)] if values else float(key.token_ids[0])))
    tier.complete_store(job, True)
    return job.keys


def load(tier, hashes: list[int]) -> list[torch.Tensor]:
    job = tier.prepare_load(hashes)
    try:
        outs = [torch.empty(LAYOUT.block_shape) for _ in hashes]
        for i, out in enumerate(outs):
            tier.read(job, i, out)
        return outs
    finally:
        tier.complete_load(job)


# -- host ------------------------------------------------------------------------------
def test_host_tier_holds_what_it_stored_and_evicts_least_recently_used() -> None:
    tier = HostTier(LAYOUT, num_slots=3)
    a, b, c, d = chain(4)
    store(tier, [a, b, c])
    assert tier.lookup([a.block_hash, b.block_hash, c.block_hash, d.block_hash]) == 3
    assert [float(t[0, 0, 0, 0, 0]) for t in load(tier, [a.block_hash])] == [0.0]  # a is now most recent
    store(tier, [d])
    assert tier.held() == [c.block_hash, a.block_hash, d.block_hash]  # b went: least recently used
    events = tier.take_events()
    assert isinstance(events[0], BlockStored) and events[0].medium == "CPU"
    assert events[0].block_hashes == (a.block_hash, b.block_hash, c.block_hash) and events[0].parent_block_hash is None
    assert BlockRemoved((b.block_hash,), "CPU") in events


def test_host_tier_never_evicts_a_pinned_block_and_a_failed_store_leaves_nothing() -> None:
    tier = HostTier(LAYOUT, num_slots=2)
    a, b, c = chain(3)
    store(tier, [a, b])
    job = tier.prepare_load([a.block_hash, b.block_hash])  # both pinned
    assert tier.prepare_store([c]).keys == []  # no room: nothing reserved
    tier.complete_load(job)
    failed = tier.prepare_store([c])
    assert failed.keys == [c]
    tier.write(failed, 0, block(9.0))
    tier.complete_store(failed, False)
    assert tier.lookup([c.block_hash]) == 0 and not any(
        isinstance(e, BlockStored) and c.block_hash in e.block_hashes for e in tier.take_events())
    assert store(tier, [c]) == [c]  # the slot freed by the failure is reused


def test_events_split_where_the_stored_blocks_stop_chaining() -> None:
    tier = HostTier(LAYOUT, num_slots=8)
    a, b, c = chain(3)
    store(tier, [b])
    tier.take_events()
    store(tier, [a, b, c])  # b is held already: a and c do not chain
    events = tier.take_events()
    assert [(e.block_hashes, e.parent_block_hash) for e in events] == [
        ((a.block_hash,), None), ((c.block_hash,), b.block_hash)]


# -- disk ------------------------------------------------------------------------------
def test_disk_admits_a_block_offered_twice_and_loads_it_back_exactly(tmp_path) -> None:
    tier = DiskTier(LAYOUT, tmp_path, capacity_bytes=1 << 20, admit_after=2)
    keys = chain(3)
    assert store(tier, keys) == []  # first offer: not admitted
    assert store(tier, keys, [1.5, 2.5, 3.5]) == keys
    assert tier.lookup([k.block_hash for k in keys]) == 3
    outs = load(tier, [k.block_hash for k in keys])
    assert [torch.equal(o, block(v)) for o, v in zip(outs, (1.5, 2.5, 3.5), strict=True)] == [True] * 3
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in tier.dir.glob("*.kvb"))


def test_disk_size_cap_evicts_least_recently_used_files(tmp_path) -> None:
    probe = DiskTier(LAYOUT, tmp_path / "probe", capacity_bytes=1 << 20, admit_after=1)
    store(probe, chain(1))
    file_size = next(probe.dir.glob("*.kvb")).stat().st_size
    tier = DiskTier(LAYOUT, tmp_path, capacity_bytes=3 * file_size, admit_after=1)
    a, b, c, d = chain(4)
    store(tier, [a, b, c])
    load(tier, [a.block_hash])
    store(tier, [d])
    assert tier.held() == [c.block_hash, a.block_hash, d.block_hash]
    assert len(list(tier.dir.glob("*.kvb"))) == 3 and tier.used_bytes == 3 * file_size


def test_a_failed_disk_store_leaves_no_file_behind(tmp_path) -> None:
    tier = DiskTier(LAYOUT, tmp_path, capacity_bytes=1 << 20, admit_after=1)
    (a,) = chain(1)
    job = tier.prepare_store([a])
    tier.write(job, 0, block(1.0))
    tier.complete_store(job, False)
    assert tier.lookup([a.block_hash]) == 0 and list(tier.dir.iterdir()) == []


def test_the_disk_tier_survives_a_restart_and_announces_what_it_holds(tmp_path) -> None:
    keys = chain(3)
    first = DiskTier(LAYOUT, tmp_path, capacity_bytes=1 << 20, admit_after=1)
    store(first, keys, [4.0, 5.0, 6.0])
    again = DiskTier(LAYOUT, tmp_path, capacity_bytes=1 << 20, admit_after=1)
    assert again.lookup([k.block_hash for k in keys]) == 3
    (announced,) = again.announce()
    assert announced.medium == "DISK" and announced.block_hashes == tuple(k.block_hash for k in keys)
    assert announced.token_ids == tuple(t for k in keys for t in k.token_ids)
    assert torch.equal(load(again, [keys[2].block_hash])[0], block(6.0))
    # another layout sees none of it (its own directory), and a file moved across is refused
    other = dataclasses.replace(LAYOUT, block_size=8)
    stranger = DiskTier(other, tmp_path, capacity_bytes=1 << 20, admit_after=1)
    assert stranger.lookup([keys[0].block_hash]) == 0
    moved = stranger.dir / next(first.dir.glob("*.kvb")).name
    moved.write_bytes(next(first.dir.glob("*.kvb")).read_bytes())
    rescanned = DiskTier(other, tmp_path, capacity_bytes=1 << 20, admit_after=1)
    assert rescanned.held() == [] and not moved.exists()


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_corrupt_or_truncated_block_file_is_dropped_never_loaded(tmp_path, damage: str) -> None:
    tier = DiskTier(LAYOUT, tmp_path, capacity_bytes=1 << 20, admit_after=1)
    (a,) = chain(1)
    store(tier, [a], [7.0])
    path = next(tier.dir.glob("*.kvb"))
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[-5] ^= 0xFF
    else:
        del data[-16:]
    path.write_bytes(bytes(data))
    job = tier.prepare_load([a.block_hash])
    out = torch.zeros(LAYOUT.block_shape)
    with pytest.raises(TierError, match="checksum mismatch|truncated"):
        tier.read(job, 0, out)
    tier.complete_load(job)
    assert torch.equal(out, torch.zeros(LAYOUT.block_shape))  # nothing of it was copied
    assert tier.lookup([a.block_hash]) == 0 and not path.exists()
    assert BlockRemoved((a.block_hash,), "DISK") in tier.take_events()


def test_a_full_disk_fails_the_store_not_the_caller(tmp_path, monkeypatch) -> None:
    import errno
    import os

    tier = DiskTier(LAYOUT, tmp_path, capacity_bytes=1 << 20, admit_after=1)
    (a,) = chain(1)
    job = tier.prepare_store([a])

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "writev", full)
    with pytest.raises(TierError, match="No space left"):
        tier.write(job, 0, block(1.0))
    tier.complete_store(job, False)
    assert tier.lookup([a.block_hash]) == 0 and tier.stats["failed_stores"] == 1
    assert list(tier.dir.iterdir()) == []
