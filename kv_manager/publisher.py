"""Worker side of KV-aware routing: publish KV events and load over ZMQ.

Wire format: `kv_manager.wire` (vLLM's `[topic, seq, msgpack KVEventBatch]`, plus Trident's
load-report and announce/leave topics on the same PUB socket). A ROUTER socket next to it
answers resync requests: vLLM's replay (the batches since a sequence number, from a bounded
buffer) and Trident's snapshot (every block hash the worker holds, as one event batch), so a
router that missed messages, or started after the worker, can rebuild its view.

On one node the sockets are ipc:// (or loopback TCP). For routers on other nodes a worker
binds TCP on its node's address, and only with `curve` (`trident.core.cluster_secret`): both
sockets are then CURVE servers and a ZAP handler admits only clients holding the cluster's
client key, so a peer without the secret can neither read the stream nor ask for snapshots.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterable

import zmq
from zmq.auth.thread import ThreadAuthenticator

from kv_manager import wire
from kv_manager.events import AllBlocksCleared, BlockRemoved, BlockStored, EngineEvents, KVEvent
from trident.core.cluster_secret import CurveKeys
from trident.core.errors import ConfigError
from trident.core.types import EngineStats

logger = logging.getLogger(__name__)

_LOOPBACK_HOSTS = ("127.0.0.1", "localhost")


class KVEventPublisher:
    """Publishes one worker's KV events, load reports and announce/leave messages.

    Who calls it: the worker model creates one when its engine has started (this binds the
    sockets and sends "announce"), then calls `publish(engine.take_events())` after engine
    steps, `report_load(engine.stats())` every ~0.5 s (the router drops a worker that stops
    reporting), and `close()` at shutdown (sends "leave"; idempotent).

    Threads: `publish` and `report_load` may be called from any thread; a lock serialises them
    (PUB sends never block: ZMQ drops messages at the high-water mark and the subscriber's
    gap detection recovers). One background thread ("kv-resync-<worker>") answers resync
    requests; `close()` stops and joins it.

    Blocks: the engine owns its blocks. The publisher only mirrors the set of block hashes it
    has announced (per medium, with each block's parent) to serve snapshots.
    """

    def __init__(
        self,
        worker_id: str,
        endpoint: str = "tcp://127.0.0.1:0",
        resync_endpoint: str | None = "auto",
        *,
        block_size: int,
        topic: bytes = wire.DEFAULT_EVENTS_TOPIC,
        data_parallel_rank: int = 0,
        replay_buffer_steps: int = 10_000,
        hwm: int = 100_000,
        linger_ms: int = 200,
        engine_events: EngineEvents | None = None,
        curve: CurveKeys | None = None,
    ) -> None:
        if not worker_id:
            raise ConfigError("worker_id must be a non-empty string")
        if block_size <= 0:
            raise ConfigError(f"block_size must be positive, got {block_size}")
        if topic in (wire.TOPIC_LOAD, wire.TOPIC_CONTROL):
            raise ConfigError(f"topic {topic!r} is reserved for load/control messages")
        self.worker_id = worker_id
        self.block_size = block_size
        self.engine_events = engine_events
        if engine_events is not None:
            resync_endpoint = None  # nothing to snapshot: the engine's own stream replays
        self.instance = uuid.uuid4().hex[:12]
        self._topic = topic
        self._dp_rank = data_parallel_rank
        self._linger_ms = linger_ms
        self._lock = threading.Lock()
        self._next_seq = 0
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=replay_buffer_steps)
        self._cached: dict[tuple[str | None, int], int | None] = {}  # (medium, hash) -> parent
        self._closed = False
        self._stop = threading.Event()
        self._ctx = zmq.Context()
        self._pub = self._ctx.socket(zmq.PUB)
        self._router: zmq.Socket | None = None
        self._thread: threading.Thread | None = None
        self._ipc_inodes: dict[str, int] = {}  # path -> inode of the socket files bound here
        self._auth: ThreadAuthenticator | None = None
        try:
            if curve is not None:
                self._auth = _start_authenticator(self._ctx, curve)
                curve.serve(self._pub)
            self._pub.setsockopt(zmq.SNDHWM, hwm)
            self.endpoint = _bind(self._pub, endpoint, "endpoint", self._ipc_inodes, secured=curve is not None)
            self.resync_endpoint = ""
            if resync_endpoint:
                self._router = self._ctx.socket(zmq.ROUTER)
                if curve is not None:
                    curve.serve(self._router)
                self.resync_endpoint = _bind(
                    self._router, _resync_address(self.endpoint, resync_endpoint), "resync_endpoint",
                    self._ipc_inodes, secured=curve is not None,
                )
        except BaseException:
            self._close_sockets()
            raise
        if self._router is not None:
            self._thread = threading.Thread(
                target=self._serve, name=f"kv-resync-{worker_id}", daemon=True
            )
            self._thread.start()
        with self._lock:
            self._pub.send_multipart(self._control_frames(wire.ANNOUNCE))
        logger.info(
            "kv publisher worker=%s events=%s resync=%s",
            worker_id,
            self.endpoint,
            self.resync_endpoint or "-",
        )

    # ------------------------------------------------------------ public API

    @property
    def next_seq(self) -> int:
        with self._lock:
            return self._next_seq

    def publish(self, events: Iterable[KVEvent]) -> int | None:
        """Send one batch; returns its sequence number (None for no events or after close)."""
        events = tuple(events)
        if not events:
            return None
        payload = wire.encode_batch(events, data_parallel_rank=self._dp_rank)
        with self._lock:
            if self._closed:
                logger.debug(
                    "kv publisher worker=%s closed: dropped %d events", self.worker_id, len(events)
                )
                return None
            seq = self._next_seq
            self._next_seq += 1
            self._pub.send_multipart(wire.pack_frames(self._topic, seq, payload))
            self._buffer.append((seq, payload))
            self._mirror(events)
        return seq

    def report_load(self, stats: EngineStats) -> None:
        """Publish the engine's load; also the worker's heartbeat."""
        with self._lock:
            if self._closed:
                return
            report = wire.LoadReport(
                worker_id=self.worker_id,
                instance=self.instance,
                ts=time.time(),
                active_blocks=stats.active_blocks,
                total_blocks=stats.total_blocks,
                running=stats.running,
                waiting=stats.waiting,
                active_prefill_tokens=stats.active_prefill_tokens,
                cached_blocks=stats.cached_blocks,
                block_size=self.block_size,
                resync_endpoint=self.resync_endpoint,
                next_seq=self._next_seq,
                **self._engine_fields(),
            )
            self._pub.send_multipart(
                wire.pack_frames(wire.TOPIC_LOAD, self._next_seq, wire.encode_load(report))
            )

    def close(self) -> None:
        """Send "leave", stop the resync thread, close the sockets. Safe to call twice."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                self._pub.send_multipart(self._control_frames(wire.LEAVE))
            except zmq.ZMQError as exc:
                logger.warning(
                    "kv publisher worker=%s: could not send leave: %s", self.worker_id, exc
                )
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._close_sockets()
        logger.info("kv publisher worker=%s closed", self.worker_id)

    def __enter__(self) -> KVEventPublisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def snapshot(self) -> tuple[int, list[KVEvent]]:
        """(next_seq, events that rebuild this worker's cache from empty)."""
        with self._lock:
            next_seq = self._next_seq
            items = list(self._cached.items())
        events: list[KVEvent] = [AllBlocksCleared()]
        run: list[int] = []
        run_key: tuple[str | None, int | None] = (None, None)  # (medium, parent of run[0])
        for (medium, block_hash), parent in items:
            if run and medium == run_key[0] and parent == run[-1]:
                run.append(block_hash)
                continue
            if run:
                events.append(
                    BlockStored(tuple(run), run_key[1], (), self.block_size, None, run_key[0])
                )
            run, run_key = [block_hash], (medium, parent)
        if run:
            events.append(
                BlockStored(tuple(run), run_key[1], (), self.block_size, None, run_key[0])
            )
        return next_seq, events

    # ------------------------------------------------------------ internals

    def _mirror(self, events: tuple[KVEvent, ...]) -> None:
        for event in events:
            if isinstance(event, BlockStored):
                parent = event.parent_block_hash
                for block_hash in event.block_hashes:
                    self._cached.setdefault((event.medium, block_hash), parent)
                    parent = block_hash
            elif isinstance(event, BlockRemoved):
                for block_hash in event.block_hashes:
                    self._cached.pop((event.medium, block_hash), None)
            elif isinstance(event, AllBlocksCleared):
                self._cached.clear()

    def _engine_fields(self) -> dict[str, str]:
        e = self.engine_events
        if e is None:
            return {}
        return {"events_endpoint": e.endpoint, "events_replay_endpoint": e.replay_endpoint, "hashes": e.hashes}

    def _control_frames(self, kind: str) -> list[bytes]:
        """Frames of an announce/leave message; the caller holds the lock."""
        message = wire.WorkerControl(
            kind=kind,
            worker_id=self.worker_id,
            instance=self.instance,
            ts=time.time(),
            block_size=self.block_size,
            resync_endpoint=self.resync_endpoint,
            next_seq=self._next_seq,
            **self._engine_fields(),
        )
        return wire.pack_frames(wire.TOPIC_CONTROL, self._next_seq, wire.encode_control(message))

    def _serve(self) -> None:
        router = self._router
        assert router is not None
        while not self._stop.is_set():
            try:
                if not router.poll(100):
                    continue
                frames = router.recv_multipart(zmq.NOBLOCK)
                self._answer(router, frames)
            except zmq.Again:
                continue
            except zmq.ZMQError as exc:
                if self._stop.is_set():
                    return
                logger.warning(
                    "kv publisher worker=%s resync socket error: %s", self.worker_id, exc
                )
                time.sleep(0.05)

    def _answer(self, router: zmq.Socket, frames: list[bytes]) -> None:
        if len(frames) != 3 or frames[1] != b"":
            logger.warning(
                "kv publisher worker=%s: malformed resync request (%d frames)",
                self.worker_id,
                len(frames),
            )
            return
        ident, request = frames[0], frames[2]
        if request == wire.SNAPSHOT:
            next_seq, events = self.snapshot()
            payload = wire.encode_batch(events, data_parallel_rank=self._dp_rank)
            router.send_multipart([ident, b"", wire.SNAPSHOT, next_seq.to_bytes(8, "big"), payload])
            logger.info(
                "kv publisher worker=%s: sent snapshot (%d events, next_seq=%d)",
                self.worker_id,
                len(events),
                next_seq,
            )
            return
        if len(request) == 8:
            start = int.from_bytes(request, "big")
            with self._lock:
                batches = [(seq, payload) for seq, payload in self._buffer if seq >= start]
            for seq, payload in batches:
                router.send_multipart([ident, b"", seq.to_bytes(8, "big"), payload])
            logger.info(
                "kv publisher worker=%s: replayed %d batches from seq %d",
                self.worker_id,
                len(batches),
                start,
            )
        else:
            logger.warning(
                "kv publisher worker=%s: unknown resync request %r", self.worker_id, request[:32]
            )
        router.send_multipart([ident, b"", wire.END_SEQ, b""])

    def _close_sockets(self) -> None:
        self._pub.close(linger=self._linger_ms)
        if self._router is not None:
            self._router.close(linger=0)
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        self._ctx.term()
        for address in (getattr(self, "endpoint", ""), getattr(self, "resync_endpoint", "")):
            _unlink_own_ipc_file(address, self._ipc_inodes)


def _unlink_own_ipc_file(address: str, inodes: dict[str, int]) -> None:
    """libzmq leaves an ipc socket's file behind on close. Remove it, unless it is no longer
    the file this publisher bound (a replacement worker bound the same path since)."""
    if not address.startswith("ipc://"):
        return
    path = address[len("ipc://"):]
    try:
        if os.stat(path).st_ino == inodes.get(path):
            os.unlink(path)
    except OSError:
        pass


class _ClusterClients:
    """ZAP credentials check: only the cluster's client key may connect."""

    def __init__(self, client_public: bytes) -> None:
        self.client_public = client_public

    def callback(self, domain: str, key: bytes) -> bool:
        if key == self.client_public:
            return True
        logger.warning("kv publisher: refused a subscriber without the cluster's key")
        return False


def _start_authenticator(ctx: zmq.Context, curve: CurveKeys) -> ThreadAuthenticator:
    auth = ThreadAuthenticator(ctx, log=logging.getLogger("kv_manager.publisher.zap"))
    auth.start()
    auth.configure_curve_callback("*", credentials_provider=_ClusterClients(curve.client_public))
    return auth


def _bind(sock: zmq.Socket, endpoint: str, field: str, ipc_inodes: dict[str, int], *, secured: bool = False) -> str:
    """Bind to a loopback TCP port (0 = any free port), an ipc path, or, `secured` (CURVE),
    TCP on any given address; return the address. An ipc socket file's inode goes into
    `ipc_inodes` (for `_unlink_own_ipc_file`)."""
    if endpoint.startswith("ipc://"):
        if len(endpoint) <= len("ipc://"):
            raise ConfigError(f"{field}: ipc endpoint needs a path, got {endpoint!r}")
        address = endpoint
    elif endpoint.startswith("tcp://"):
        host, _, port = endpoint[len("tcp://") :].rpartition(":")
        if host not in _LOOPBACK_HOSTS and not secured:
            raise ConfigError(
                f"{field}: must bind to 127.0.0.1 (or use ipc://), got {endpoint!r}; other "
                "addresses need the cluster secret (CURVE)"
            )
        if not host or host in ("*", "0.0.0.0", "::"):
            raise ConfigError(f"{field}: bind to this node's address, not a wildcard: {endpoint!r}")
        if not port.isdigit() or int(port) > 65535:
            raise ConfigError(f"{field}: bad port in {endpoint!r}")
        host = "127.0.0.1" if host == "localhost" else host
        address = f"tcp://{host}:{'*' if int(port) == 0 else port}"
    else:
        raise ConfigError(f"{field}: expected tcp://127.0.0.1:PORT or ipc://PATH, got {endpoint!r}")
    try:
        sock.bind(address)
    except zmq.ZMQError as exc:
        raise ConfigError(f"{field}: cannot bind {endpoint!r}: {exc}") from None
    if address.startswith("ipc://"):
        path = address[len("ipc://"):]
        ipc_inodes[path] = os.stat(path).st_ino
    return sock.getsockopt_string(zmq.LAST_ENDPOINT)


def _resync_address(events_endpoint: str, resync_endpoint: str) -> str:
    if resync_endpoint != "auto":
        return resync_endpoint
    if events_endpoint.startswith("ipc://"):
        return events_endpoint + "-resync"
    host = events_endpoint[len("tcp://"):].rpartition(":")[0]
    return f"tcp://{host}:0"
