"""Publisher -> subscriber -> router over real ZMQ: joins, gaps, resync, silence, leave, restart."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator

import pytest
import zmq

from kv_manager import wire
from kv_manager.block_pool import BlockPool
from kv_manager.events import BlockRemoved, BlockStored
from kv_manager.hashing import hash_blocks
from kv_manager.publisher import KVEventPublisher
from router_ensemble.routing.config import RoutingConfig
from router_ensemble.routing.router import KvRouter
from router_ensemble.routing.subscriber import KvEventSubscriber, WorkerEndpoint
from tests.waiting import wait_until
from trident.core.types import EngineStats

BS = 16
PROMPT = list(range(500, 500 + 16 * 12))
HASHES = hash_blocks(PROMPT, BS)
STATS = EngineStats(
    running=0,
    waiting=0,
    active_blocks=0,
    total_blocks=512,
    cached_blocks=0,
    active_prefill_tokens=0,
    prompt_tokens=0,
    cached_prompt_tokens=0,
    generated_tokens=0,
    preemptions=0,
)


def stored(hashes, parent=None) -> BlockStored:
    return BlockStored(tuple(hashes), parent, (), BS)


class LossyLink:
    """The publisher's PUB socket with a switch that loses the next message, as a full HWM or a
    flaky link would."""

    def __init__(self, sock: zmq.Socket) -> None:
        self._sock = sock
        self.lose_next = False

    def send_multipart(self, frames) -> None:
        if self.lose_next:
            self.lose_next = False
            return
        self._sock.send_multipart(frames)

    def __getattr__(self, name: str):
        return getattr(self._sock, name)


@pytest.fixture(autouse=True)
def no_thread_left() -> Iterator[None]:
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        extra = [t for t in threading.enumerate() if t not in before and t.is_alive()]
        if not extra:
            return
        time.sleep(0.02)
    raise AssertionError(f"threads left running: {extra}")


@pytest.fixture
def router() -> KvRouter:
    return KvRouter(RoutingConfig(block_size=BS, seed=0, worker_timeout_s=0.6, resync_timeout_s=0.5))


def matches(router: KvRouter) -> dict[str, int]:
    return router.index.find_matches(HASHES)


def test_late_router_catches_up_by_snapshot(router: KvRouter) -> None:
    with KVEventPublisher("decode", block_size=BS) as pub, KvEventSubscriber(router) as sub:
        pub.publish([stored(HASHES[:8])])
        pub.publish([BlockRemoved(tuple(HASHES[6:8]))])  # before the router listens
        sub.add_worker(WorkerEndpoint("decode", pub.endpoint))
        wait_until(lambda: matches(router) == {"decode": 6}, tick=lambda: pub.report_load(STATS))
        assert router.workers() == ["decode"]
        assert sub.status("decode")["resyncs"] == 1
        pub.publish([stored(HASHES[6:], HASHES[5])])  # live from here on
        wait_until(lambda: matches(router) == {"decode": 12})
        decision = router.decide(PROMPT)
        assert decision.worker_id == "decode" and decision.cached_tokens == 12 * BS


def test_gap_in_the_middle_and_at_the_tail(router: KvRouter) -> None:
    with KVEventPublisher("decode", block_size=BS) as pub, KvEventSubscriber(router) as sub:
        sub.add_worker(WorkerEndpoint("decode", pub.endpoint))
        wait_until(lambda: router.workers() == ["decode"], tick=lambda: pub.report_load(STATS))
        wait_until(lambda: not sub.status("decode")["resyncing"])
        resyncs = sub.status("decode")["resyncs"]
        link = LossyLink(pub._pub)
        pub._pub = link
        pub.publish([stored(HASHES[:3])])
        link.lose_next = True
        pub.publish([stored(HASHES[3:6], HASHES[2])])  # lost
        pub.publish([stored(HASHES[6:9], HASHES[5])])  # seq jumps: gap
        wait_until(lambda: matches(router) == {"decode": 9})
        status = sub.status("decode")
        assert status["gaps"] == 1 and status["resyncs"] == resyncs + 1 and status["next_seq"] == 3
        link.lose_next = True
        pub.publish([stored(HASHES[9:], HASHES[8])])  # lost, and nothing follows but reports
        wait_until(lambda: matches(router) == {"decode": 12}, tick=lambda: pub.report_load(STATS))
        assert sub.status("decode")["gaps"] == 2


def test_silent_worker_is_dropped_and_comes_back(router: KvRouter) -> None:
    with (
        KVEventPublisher("decode", block_size=BS) as pub,
        KVEventPublisher("decode_1", block_size=BS) as other,
        KvEventSubscriber(router) as sub,
    ):
        sub.add_worker(WorkerEndpoint("decode", pub.endpoint))
        sub.add_worker(WorkerEndpoint("decode_1", other.endpoint))
        pub.publish([stored(HASHES)])

        def beat() -> None:
            pub.report_load(STATS)
            other.report_load(STATS)

        wait_until(lambda: matches(router) == {"decode": 12}, tick=beat)
        assert router.decide(PROMPT).worker_id == "decode"
        # decode stops reporting; decode_1 goes on
        wait_until(
            lambda: router.workers() == ["decode_1"],
            tick=lambda: other.report_load(STATS),
            timeout=5,
        )
        assert matches(router) == {}
        assert all(router.decide(PROMPT).worker_id == "decode_1" for _ in range(3))
        # it reports again: back in, its cache restored by a snapshot
        wait_until(lambda: matches(router) == {"decode": 12}, tick=beat)
        assert set(router.workers()) == {"decode", "decode_1"}


def test_worker_silent_from_the_start_is_removed_until_it_speaks(router: KvRouter, tmp_path) -> None:
    endpoint = f"ipc://{tmp_path}/decode.kv"
    with KvEventSubscriber(router, worker_timeout_s=0.3) as sub:
        sub.add_worker(WorkerEndpoint("decode", endpoint, reports_load=True))
        sub.add_worker(WorkerEndpoint("plain_vllm", f"ipc://{tmp_path}/vllm.kv"))  # no heartbeat
        wait_until(lambda: router.is_down("decode"), timeout=3)
        assert router.removals("decode") == 1
        assert not router.is_down("plain_vllm") and router.removals("plain_vllm") == 0
        time.sleep(0.5)
        assert router.removals("decode") == 1  # removed once, not on every poll
        with KVEventPublisher("decode", endpoint, block_size=BS) as pub:  # it comes up after all
            wait_until(lambda: router.workers() == ["decode"], tick=lambda: pub.report_load(STATS))
            assert not router.is_down("decode")


def test_leave_removes_the_worker_at_once(router: KvRouter) -> None:
    with KvEventSubscriber(router) as sub:
        pub = KVEventPublisher("decode", block_size=BS)
        sub.add_worker(WorkerEndpoint("decode", pub.endpoint))
        pub.publish([stored(HASHES)])
        wait_until(lambda: matches(router) == {"decode": 12}, tick=lambda: pub.report_load(STATS))
        pub.close()
        wait_until(lambda: router.workers() == [], timeout=2)
        assert router.index.num_blocks() == 0


def test_restart_on_the_same_endpoint_replaces_the_cache(router: KvRouter, tmp_path) -> None:
    endpoint = f"ipc://{tmp_path}/decode"
    with KvEventSubscriber(router) as sub:
        sub.add_worker(WorkerEndpoint("decode", endpoint))
        first = KVEventPublisher("decode", endpoint, block_size=BS)
        first.publish([stored(HASHES)])
        wait_until(lambda: matches(router) == {"decode": 12}, tick=lambda: first.report_load(STATS))
        first._pub = link = LossyLink(first._pub)
        link.lose_next = True
        first.close()  # as if it crashed: its "leave" never arrives
        second = KVEventPublisher("decode", endpoint, block_size=BS)
        try:
            second.publish([stored(HASHES[:2])])
            wait_until(
                lambda: matches(router) == {"decode": 2}, tick=lambda: second.report_load(STATS)
            )
            assert sub.status("decode")["restarts"] >= 1
        finally:
            second.close()


def test_unanswered_resync_does_not_freeze_the_worker(router: KvRouter) -> None:
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    dead = ctx.socket(zmq.ROUTER)  # a resync endpoint that never answers
    dead_port = dead.bind_to_random_port("tcp://127.0.0.1")
    try:
        with KvEventSubscriber(router) as sub:
            sub.add_worker(
                WorkerEndpoint(
                    "vllm", f"tcp://127.0.0.1:{port}", f"tcp://127.0.0.1:{dead_port}", "replay"
                )
            )
            seq = iter(range(5, 1000))

            def send() -> None:  # starts at 5: the router missed 0..4 and asks for a replay
                pub.send_multipart(
                    wire.pack_frames(b"", next(seq), wire.encode_batch([stored(HASHES)]))
                )

            wait_until(lambda: router.workers() == ["vllm"], tick=send)
            t0 = time.monotonic()
            router.decide(PROMPT)  # never waits on the worker
            assert time.monotonic() - t0 < 0.1
            wait_until(lambda: matches(router) == {"vllm": 12}, timeout=3)
            assert sub.status("vllm")["resyncs"] >= 1 and not sub.status("vllm")["resyncing"]
    finally:
        ctx.destroy(linger=0)


def test_close_is_idempotent_and_safe_before_start(router: KvRouter) -> None:
    KvEventSubscriber(router).close()
    sub = KvEventSubscriber(router).start()
    sub.add_worker(
        WorkerEndpoint("w", "tcp://127.0.0.1:9")
    )  # nobody there: connect retries quietly
    sub.close()
    sub.close()


def test_block_pool_events_reach_the_router(router: KvRouter) -> None:
    """The engine's real prefix cache -> publisher -> subscriber -> the router's lookup."""
    pool = BlockPool(num_blocks=16, block_size=BS)
    with KVEventPublisher("decode", block_size=BS) as pub, KvEventSubscriber(router) as sub:
        sub.add_worker(WorkerEndpoint("decode", pub.endpoint))
        wait_until(lambda: router.workers() == ["decode"], tick=lambda: pub.report_load(STATS))
        blocks = pool.get_new_blocks(12)
        pool.cache_full_blocks(blocks, HASHES, PROMPT, None)
        pool.free_blocks(blocks)
        pub.publish(pool.take_events())
        wait_until(lambda: router.decide(PROMPT).overlap_blocks == 12)
        pool.free_blocks(pool.get_new_blocks(8))  # 4 free + 4 evicted from the prompt's tail
        pub.publish(pool.take_events())
        wait_until(lambda: matches(router) == {"decode": 8})


def test_a_subscriber_without_workers_sleeps() -> None:
    """A pool with no worker yet (no prefill worker loaded) must not spin its thread."""
    router = KvRouter(RoutingConfig(block_size=16))
    with KvEventSubscriber(router, poll_ms=20) as subscriber:
        thread = next(t for t in threading.enumerate() if t.name == "kv-subscriber")
        time.sleep(0.05)
        busy = _cpu_seconds(thread.native_id)
        time.sleep(0.5)
        used = _cpu_seconds(thread.native_id) - busy
        assert subscriber.status() == {}
    assert used < 0.2, f"an idle subscriber used {used:.2f} s of CPU in 0.5 s"


def _cpu_seconds(tid: int | None) -> float:
    """User + system CPU time of one thread of this process (Linux /proc)."""
    fields = open(f"/proc/self/task/{tid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
