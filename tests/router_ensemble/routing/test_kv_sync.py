"""StreamSync: sequence gaps, restarts, snapshot and replay resync (no sockets)."""

from __future__ import annotations

from kv_manager.events import AllBlocksCleared, BlockRemoved, BlockStored
from router_ensemble.routing.sync import StreamSync


def ev(n: int) -> tuple:
    return (BlockStored((n,), None, (), 4),)


def test_in_order_stream_applies_directly() -> None:
    sync = StreamSync("w")
    for seq in range(3):
        actions = sync.on_batch(seq, ev(seq))
        assert actions.apply == [ev(seq)] and not actions.resync and not actions.clear
    assert sync.next_seq == 3 and sync.gaps == 0


def test_gap_holds_batches_until_snapshot() -> None:
    sync = StreamSync("w")
    sync.on_batch(0, ev(0))
    actions = sync.on_batch(2, ev(2))  # 1 lost
    assert actions.resync and actions.apply == [] and sync.gaps == 1
    assert sync.begin_resync(now=1.0) == 1
    assert sync.on_batch(3, ev(3)).apply == []  # held while resyncing
    assert sync.on_batch(4, ev(4)).apply == []
    snapshot = (AllBlocksCleared(), BlockStored((0, 1, 2, 3), None, (), 4))
    actions = sync.on_snapshot(4, snapshot)  # covers batches 0..3
    assert actions.clear and actions.apply == [snapshot, ev(4)]
    assert sync.next_seq == 5 and not sync.resyncing


def test_tail_gap_seen_from_load_report() -> None:
    sync = StreamSync("w")
    sync.on_hint(0, "inst")
    sync.on_batch(0, ev(0))
    assert not sync.on_hint(1, "inst").resync
    actions = sync.on_hint(3, "inst")  # batches 1 and 2 never arrived
    assert actions.resync and sync.gaps == 1


def test_first_contact() -> None:
    fresh = StreamSync("w")
    assert fresh.on_batch(0, ev(0)).apply == [ev(0)]
    late = StreamSync("w")
    actions = late.on_batch(5, ev(5))
    assert actions.resync and late.gaps == 0  # missed history is not a gap
    idle = StreamSync("w")
    assert not idle.on_hint(0, "i").resync and idle.next_seq == 0
    busy = StreamSync("w")
    assert busy.on_hint(7, "i").resync


def test_restart_by_instance_or_sequence() -> None:
    sync = StreamSync("w")
    sync.on_hint(0, "one")
    sync.on_batch(0, ev(0))
    sync.on_batch(1, ev(1))
    actions = sync.on_hint(0, "two")
    assert actions.clear and not actions.resync and sync.restarts == 1 and sync.next_seq == 0
    sync.on_batch(0, ev(10))
    sync.on_batch(1, ev(11))
    actions = sync.on_batch(0, ev(20))  # sequence went back: a restart we did not hear about
    assert actions.clear and actions.apply == [ev(20)] and sync.restarts == 2
    actions = sync.on_batch(3, ev(23))
    assert actions.resync


def test_replay_merges_replayed_and_held() -> None:
    sync = StreamSync("w")
    sync.on_batch(0, ev(0))
    sync.on_batch(3, ev(3))
    assert sync.begin_resync(now=0.0) == 1
    sync.on_batch(4, ev(4))
    for seq in (1, 2, 3):
        sync.on_replay_batch(seq, ev(seq))
    actions = sync.on_replay_end()
    assert actions.apply == [ev(1), ev(2), ev(3), ev(4)]  # 3 arrived twice, applied once
    assert sync.next_seq == 5 and sync.gaps == 1


def test_replay_that_cannot_cover_the_gap() -> None:
    sync = StreamSync("w")
    sync.on_batch(0, ev(0))
    sync.on_batch(5, ev(5))
    sync.begin_resync(now=0.0)
    sync.on_replay_batch(4, ev(4))  # the worker's buffer starts at 4: 1..3 are gone
    actions = sync.on_replay_end()
    assert actions.apply == [ev(4), ev(5)] and sync.next_seq == 6


def test_give_up_releases_held_batches() -> None:
    sync = StreamSync("w")
    sync.on_batch(0, ev(0))
    sync.on_batch(2, ev(2))
    sync.begin_resync(now=0.0)
    sync.on_batch(3, ev(3))
    actions = sync.give_up("timeout")
    assert actions.apply == [ev(2), ev(3)] and sync.next_seq == 4 and not sync.resyncing
    assert sync.on_hint(9, None).resync  # a later report shows more loss: resync again


def test_give_up_without_batches_trusts_the_hint() -> None:
    sync = StreamSync("w")
    assert sync.on_hint(6, "i").resync
    sync.begin_resync(now=0.0)
    sync.give_up("no resync endpoint")
    assert sync.next_seq == 6
    assert not sync.on_hint(6, "i").resync  # no endless resync loop
    assert sync.on_batch(6, (BlockRemoved((1,)),)).apply


def test_reset_keeps_counters() -> None:
    sync = StreamSync("w")
    sync.on_batch(0, ev(0))
    sync.on_batch(2, ev(2))
    sync.reset()
    assert sync.next_seq is None and sync.gaps == 1
    assert sync.on_batch(0, ev(0)).apply == [ev(0)]
