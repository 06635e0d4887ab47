"""PoolRouting (discovery + subscriber + selector) over real ZMQ publishers, and the watched client."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kv_manager.events import BlockRemoved, BlockStored
from kv_manager.hashing import hash_blocks
from kv_manager.publisher import KVEventPublisher
from router_ensemble.routing.config import RoutingConfig
from router_ensemble.routing.directory import WorkerDirectory
from router_ensemble.triton.kv_routing import PoolRouting
from router_ensemble.triton.watched_client import WatchedWorkerClient
from tests.waiting import wait_until
from trident.core.endpoints import events_endpoint
from trident.core.errors import EngineError, WorkerUnavailable
from trident.core.types import EngineStats, GenerateRequest, SamplingParams, TokenChunk

BS = 16
PROMPT = list(range(300, 300 + 10 * BS + 5))
STATS = EngineStats(0, 0, 0, 256, 0, 0, 0, 0, 0, 0)


@pytest.fixture
def ready() -> set[str]:
    return {"decode", "decode_1"}


@pytest.fixture
def routing(tmp_path: Path, ready: set[str]) -> Iterator[PoolRouting]:
    directory = WorkerDirectory("decode", probe=lambda name: name in ready, refresh_s=0.0)
    config = RoutingConfig(block_size=BS, seed=0, worker_timeout_s=0.5)
    kv = PoolRouting(directory, config, tmp_path).start()
    yield kv
    kv.close()


def publisher(name: str, tmp_path: Path) -> KVEventPublisher:
    return KVEventPublisher(name, events_endpoint(name, tmp_path), block_size=BS)


def test_discovers_workers_and_routes_to_the_prefix_holder(
    routing: PoolRouting, tmp_path: Path, ready: set[str]
) -> None:
    with publisher("decode", tmp_path) as a, publisher("decode_1", tmp_path) as b:
        hashes = hash_blocks(PROMPT, BS)
        b.publish([BlockStored(tuple(hashes[:8]), None, (), BS)])

        def tick() -> None:  # request threads sync the subscriptions; here the test does
            routing.selector.ready()
            a.report_load(STATS)
            b.report_load(STATS)

        wait_until(lambda: routing.router.index.find_matches(hashes) == {"decode_1": 8}, tick=tick)
        selection = routing.selector.select("r1", PROMPT)
        assert (selection.worker, selection.cached_tokens) == ("decode_1", 8 * BS)
        routing.selector.release("r1")
        routing.selector.record_served("decode_1", len(PROMPT), 8 * BS)
        snap = routing.router.metrics.snapshot()
        assert snap["decisions"] == {"decode_1": 1} and snap["served_cached_tokens"] == 8 * BS
        # the model is unloaded: the router stops routing there and forgets its blocks
        ready.discard("decode_1")
        wait_until(lambda: routing.router.index.find_matches(hashes) == {}, tick=tick)
        assert routing.selector.select("r2", PROMPT).worker == "decode"
        assert routing.router.removals("decode_1") >= 1


def test_first_request_sees_a_history_held_only_in_a_host_tier(
    routing: PoolRouting, tmp_path: Path
) -> None:
    # Both workers served traffic before the router routed anything: decode_1 holds the
    # prompt's history in host memory only (stored on device and in host memory, then
    # evicted from the device). The router found their sockets itself, so the very first
    # decision, with no wait of the test's own, sends the user to decode_1.
    hashes = hash_blocks(PROMPT, BS)
    with publisher("decode", tmp_path) as a, publisher("decode_1", tmp_path) as b:
        a.publish([BlockStored(tuple(range(1, 9)), None, (), BS)])
        b.publish([
            BlockStored(tuple(hashes[:8]), None, (), BS),
            BlockStored(tuple(hashes[:8]), None, (), BS, medium="CPU"),
            BlockRemoved(tuple(hashes[:8])),
        ])
        with heartbeats(a, b):
            selection = routing.selector.select("r1", PROMPT)
        assert (selection.worker, selection.cached_tokens) == ("decode_1", 8 * BS)
        assert routing.router.index.find_weighted_matches(hashes, ["decode", "decode_1"])[1] == {
            "decode_1": 8 * 0.75
        }


def test_the_router_follows_a_worker_from_its_socket_before_any_request(
    routing: PoolRouting, tmp_path: Path
) -> None:
    hashes = hash_blocks(PROMPT, BS)
    with publisher("decode_1", tmp_path) as b, publisher("prefill", tmp_path), heartbeats(b):
        b.publish([BlockStored(tuple(hashes[:4]), None, (), BS)])
        wait_until(lambda: routing.router.index.find_matches(hashes) == {"decode_1": 4})
        assert routing.subscriber.status("decode_1")["synced"]
        assert routing.subscriber.status("prefill") == {}  # another pool's socket


@contextlib.contextmanager
def heartbeats(*publishers: KVEventPublisher, interval: float = 0.1) -> Iterator[None]:
    """Load reports from each publisher every `interval`, as a Trident worker sends them."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.is_set():
            for pub in publishers:
                pub.report_load(STATS)
            stop.wait(interval)

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def test_silent_worker_is_skipped_and_none_ready_is_an_error(
    routing: PoolRouting, tmp_path: Path, ready: set[str]
) -> None:
    with publisher("decode", tmp_path) as a, publisher("decode_1", tmp_path) as b:
        wait_until(
            lambda: set(routing.router.workers()) == ready,
            tick=lambda: (routing.selector.ready(), a.report_load(STATS), b.report_load(STATS)),
        )
        # decode_1 stops reporting (its process died): after worker_timeout_s it is skipped
        wait_until(lambda: routing.router.is_down("decode_1"), tick=lambda: a.report_load(STATS))
        assert {routing.selector.select(f"q{i}", PROMPT).worker for i in range(6)} == {"decode"}
    ready.clear()
    with pytest.raises(WorkerUnavailable, match="no decode worker is ready"):
        routing.selector.select("q", PROMPT)


class ScriptedClient:
    """A WorkerClient whose stream yields `chunks`, then blocks until `release` is set, the
    way a BLS stream from a dead worker stub never ends."""

    def __init__(self, chunks: list[TokenChunk], interval: float = 0.0) -> None:
        self.chunks = chunks
        self.interval = interval
        self.release = threading.Event()
        self.aborted: list[str] = []

    def generate(self, worker: str, request: GenerateRequest) -> Iterator[TokenChunk]:
        for chunk in self.chunks:
            time.sleep(self.interval)
            yield chunk
        self.release.wait(30)
        yield TokenChunk(request.request_id, (), True, "abort")

    def abort(self, worker: str, request_id: str) -> None:
        self.aborted.append(request_id)
        self.release.set()


REQUEST = GenerateRequest("req1", (1, 2, 3), SamplingParams(max_tokens=4))


def chunk(*ids: int, finished: bool = False) -> TokenChunk:
    return TokenChunk("req1", ids, finished, "length" if finished else None, 3, 0)


def test_a_stream_from_a_removed_worker_ends_with_an_error() -> None:
    removed = {"n": 0}
    inner = ScriptedClient([chunk(5)])
    client = WatchedWorkerClient(inner, lambda w: removed["n"], poll_s=0.02, stall_s=0.2)
    stream = client.generate("decode_1", REQUEST)
    assert next(stream).output_ids == (5,)
    timer = threading.Timer(0.3, lambda: removed.update(n=1))
    timer.start()
    started = time.monotonic()
    with pytest.raises(WorkerUnavailable, match="worker decode_1 went away while serving request req1"):
        next(stream)
    assert time.monotonic() - started < 2.0
    inner.release.set()


def test_a_live_worker_is_not_cut_off_and_early_close_aborts() -> None:
    removed = {"n": 1}
    # slow but streaming: the worker is not counted as removed, so nothing fires
    inner = ScriptedClient([chunk(i) for i in range(5)] + [chunk(9, finished=True)], interval=0.05)
    client = WatchedWorkerClient(inner, lambda w: removed["n"], poll_s=0.01, stall_s=0.02)
    assert [c.output_ids for c in client.generate("decode", REQUEST)][-1] == (9,)
    # closing after the first chunk asks the worker to abort and waits for the stream's end
    inner = ScriptedClient([chunk(1), chunk(2)])
    client = WatchedWorkerClient(inner, lambda w: removed["n"], poll_s=0.01)
    stream = client.generate("decode", REQUEST)
    next(stream)
    stream.close()
    assert inner.aborted == ["req1"]


def test_worker_errors_pass_through() -> None:
    class Failing:
        def generate(self, worker: str, request: GenerateRequest) -> Iterator[TokenChunk]:
            yield chunk(1)
            raise EngineError("decode: engine step failed")

    client = WatchedWorkerClient(Failing(), lambda w: 0, poll_s=0.01)
    with pytest.raises(EngineError, match="engine step failed"):
        list(client.generate("decode", REQUEST))
