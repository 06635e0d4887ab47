"""KVEventPublisher over real ZMQ sockets on 127.0.0.1 and ipc:// in a temp dir."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest
import zmq

from kv_manager import wire
from kv_manager.events import AllBlocksCleared, BlockRemoved, BlockStored
from kv_manager.publisher import KVEventPublisher
from router_ensemble.routing.index import KvIndex
from trident.core.errors import ConfigError
from trident.core.types import EngineStats

STATS = EngineStats(
    running=2,
    waiting=1,
    active_blocks=30,
    total_blocks=100,
    cached_blocks=12,
    active_prefill_tokens=48,
    prompt_tokens=0,
    cached_prompt_tokens=0,
    generated_tokens=0,
    preemptions=0,
)


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
def ctx() -> Iterator[zmq.Context]:
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


def connect_sub(ctx: zmq.Context, pub: KVEventPublisher) -> zmq.Socket:
    """A raw SUB socket, returned once the subscription is live (heartbeats get through)."""
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(pub.endpoint)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        pub.report_load(STATS)
        if sub.poll(50):
            while sub.poll(50):
                sub.recv_multipart()
            return sub
    raise AssertionError("subscription never became live")


def recv(sub: zmq.Socket) -> tuple[bytes, int, bytes]:
    assert sub.poll(5000), "nothing received"
    return wire.unpack_frames(sub.recv_multipart())


def resync_request(ctx: zmq.Context, endpoint: str, request: bytes) -> list[list[bytes]]:
    dealer = ctx.socket(zmq.DEALER)
    dealer.connect(endpoint)
    dealer.send_multipart([b"", request])
    replies = []
    while dealer.poll(5000):
        frames = dealer.recv_multipart()
        assert frames[0] == b""
        replies.append(frames[1:])
        if frames[1] in (wire.END_SEQ, wire.SNAPSHOT):
            break
    dealer.close(linger=0)
    return replies


def test_batches_load_and_leave_on_the_wire(ctx: zmq.Context) -> None:
    with KVEventPublisher("decode", block_size=4, data_parallel_rank=0) as pub:
        assert pub.endpoint.startswith("tcp://127.0.0.1:") and pub.resync_endpoint.startswith(
            "tcp://127.0.0.1:"
        )
        sub = connect_sub(ctx, pub)
        stored = BlockStored((1, 2), None, tuple(range(8)), 4)
        assert pub.publish([stored]) == 0
        assert pub.publish([]) is None  # nothing to send, no sequence number used
        assert pub.publish([BlockRemoved((2,))]) == 1
        topic, seq, payload = recv(sub)
        assert (topic, seq) == (b"kv-events", 0)
        ts, events, rank = msgpack.unpackb(payload)
        assert (
            events == [["BlockStored", [1, 2], None, list(range(8)), 4, None, "GPU"]] and rank == 0
        )
        assert abs(ts - time.time()) < 60
        assert recv(sub)[1] == 1
        pub.report_load(STATS)
        topic, seq, payload = recv(sub)
        load = wire.decode_load(payload)
        assert topic == wire.TOPIC_LOAD and seq == 2 and load.next_seq == 2
        assert (load.active_blocks, load.total_blocks, load.running, load.waiting) == (
            30,
            100,
            2,
            1,
        )
        assert (
            load.active_prefill_tokens == 48 and load.cached_blocks == 12 and load.block_size == 4
        )
        assert load.resync_endpoint == pub.resync_endpoint and load.worker_id == "decode"
        pub.close()
        topic, _, payload = recv(sub)
        assert topic == wire.TOPIC_CONTROL and wire.decode_control(payload).kind == wire.LEAVE
        assert pub.publish([stored]) is None
        pub.close()  # idempotent
    sub.close(linger=0)


def test_snapshot_rebuilds_the_cache(ctx: zmq.Context) -> None:
    with KVEventPublisher("w", block_size=4) as pub:
        pub.publish([BlockStored((1, 2, 3), None, tuple(range(12)), 4)])
        pub.publish(
            [
                BlockStored((4, 5), 3, tuple(range(8)), 4),
                BlockStored((9,), None, (0,) * 4, 4, None, "CPU"),
            ]
        )
        pub.publish([BlockRemoved((5, 2))])
        pub.publish([BlockStored((7,), 1, (1,) * 4, 4)])
        replies = resync_request(ctx, pub.resync_endpoint, wire.SNAPSHOT)
    assert len(replies) == 1 and replies[0][0] == wire.SNAPSHOT
    next_seq = int.from_bytes(replies[0][1], "big")
    batch = wire.decode_batch(replies[0][2])
    assert next_seq == 4
    assert batch.events[0] == AllBlocksCleared()
    index = KvIndex()
    index.apply_events("w", batch.events)
    assert sorted(h for h in (1, 2, 3, 4, 5, 7, 9) if index.contains("w", h)) == [1, 3, 4, 7, 9]
    runs = [(e.block_hashes, e.parent_block_hash, e.medium) for e in batch.events[1:]]
    assert (
        ((1,), None, "GPU") in runs and ((3, 4), 2, "GPU") in runs and ((9,), None, "CPU") in runs
    )


def test_vllm_style_replay(ctx: zmq.Context) -> None:
    with KVEventPublisher("w", block_size=4, replay_buffer_steps=3) as pub:
        for n in range(5):
            pub.publish([BlockStored((n,), None, (), 4)])
        replies = resync_request(ctx, pub.resync_endpoint, (1).to_bytes(8, "big"))
        # buffer holds the last 3 batches: 2, 3, 4, then the end marker
        assert [int.from_bytes(r[0], "big") for r in replies[:-1]] == [2, 3, 4]
        assert replies[-1] == [wire.END_SEQ, b""]
        assert wire.decode_batch(replies[0][1]).events == (BlockStored((2,), None, (), 4),)
        assert resync_request(ctx, pub.resync_endpoint, b"what?") == [[wire.END_SEQ, b""]]


def test_concurrent_publishers_get_unique_ordered_sequence(ctx: zmq.Context) -> None:
    with KVEventPublisher("w", block_size=4) as pub:
        sub = connect_sub(ctx, pub)
        seqs: list[int] = []
        lock = threading.Lock()

        def worker(base: int) -> None:
            for n in range(50):
                seq = pub.publish([BlockStored((base + n,), None, (), 4)])
                with lock:
                    seqs.append(seq)

        threads = [threading.Thread(target=worker, args=(k * 1000,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(seqs) == list(range(200))
        received = [recv(sub)[1] for _ in range(200)]
        assert received == list(range(200))
    sub.close(linger=0)


def test_ipc_endpoints(tmp_path, ctx: zmq.Context) -> None:
    endpoint = f"ipc://{tmp_path}/decode"
    with KVEventPublisher("decode", endpoint, block_size=4) as pub:
        assert pub.endpoint == endpoint and pub.resync_endpoint == endpoint + "-resync"
        sub = connect_sub(ctx, pub)
        pub.publish([AllBlocksCleared()])
        assert recv(sub)[1] == 0
    sub.close(linger=0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"endpoint": "tcp://0.0.0.0:0"}, "127.0.0.1"),
        ({"endpoint": "tcp://*:5557"}, "127.0.0.1"),
        ({"endpoint": "tcp://127.0.0.1:http"}, "port"),
        ({"endpoint": "udp://127.0.0.1:1"}, "endpoint"),
        ({"resync_endpoint": "tcp://10.0.0.1:0"}, "resync_endpoint"),
        ({"block_size": 0}, "block_size"),
        ({"topic": wire.TOPIC_LOAD}, "reserved"),
    ],
)
def test_bad_config(kwargs: dict, match: str) -> None:
    args = {"worker_id": "w", "block_size": 4, **kwargs}
    with pytest.raises(ConfigError, match=match):
        KVEventPublisher(**args)


def test_port_in_use_is_a_config_error() -> None:
    with KVEventPublisher("a", block_size=4) as first:
        with pytest.raises(ConfigError, match="cannot bind"):
            KVEventPublisher("b", first.endpoint, block_size=4)


def test_ipc_socket_files_are_removed_on_close_unless_replaced(tmp_path) -> None:
    path = tmp_path / "decode.kv"
    pub = KVEventPublisher("decode", f"ipc://{path}", block_size=16)
    assert path.exists() and Path(f"{path}-resync").exists()
    pub.close()
    assert not path.exists() and not Path(f"{path}-resync").exists()
    # a reloaded worker binds the same path before the old instance closes: its file stays
    old = KVEventPublisher("decode", f"ipc://{path}", block_size=16)
    new = KVEventPublisher("decode", f"ipc://{path}", block_size=16)
    old.close()
    assert path.exists() and Path(f"{path}-resync").exists()
    new.close()
    assert not path.exists()
