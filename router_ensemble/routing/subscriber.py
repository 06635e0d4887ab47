"""Router side of KV events: one background thread that listens to every worker's publisher.

For each worker it holds a SUB socket connected to the worker's PUB endpoint (Trident's
`kv_manager.publisher`, or a vLLM/SGLang engine's `--kv-events-config` endpoint) and, while a
resync runs, a DEALER socket to the worker's resync (ROUTER) endpoint. What arrives feeds the
`KvRouter`: event batches go to its index in sequence order (`router_ensemble.routing.sync` decides
when to clear, apply, hold and resync), load reports to its load table, and a worker enters
the router on its first message and leaves on "leave" or when its load reports stop for
`worker_timeout_s` (its index entries go with it). A worker subscribed as `reports_load`
(Trident's, which heartbeat from the moment they are ready) that says nothing for
`worker_timeout_s` after subscribing is removed too (it died before its first report).
Workers that never send load reports (plain vLLM) are never timed out.

Workers join by `add_worker`, and, when the owner gives a `discover` callable, by discovery:
the thread calls it every `discover_s` and listens to every endpoint it returns that it does
not listen to yet. So the router follows a worker's stream from the moment the worker binds
it, not from its first routed request. A worker counts as *synced* once its stream position
is known and no resync is in flight (its index entry is whole); `wait_synced` lets a request
thread wait for that, bounded, before it routes on a worker seen for the first time.

Resync modes per worker: "snapshot" (Trident publishers: one reply rebuilds the worker),
"replay" (vLLM's replay endpoint: the missed batches), "none"; "auto" picks snapshot once the
worker has announced its resync endpoint, else replay if one is configured, else none.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from typing import Any

import zmq

from kv_manager import wire
from router_ensemble.routing.router import KvRouter
from router_ensemble.routing.sync import Actions, StreamSync
from router_ensemble.routing.translate import HASH_SCHEMES, HashTranslator
from trident.core.cluster_secret import CurveKeys
from trident.core.errors import ConfigError, ValidationError

logger = logging.getLogger(__name__)

RESYNC_MODES = ("auto", "snapshot", "replay", "none")
_MAX_DRAIN = 256  # messages taken from one socket per poll round, so no worker starves others


@dataclass(frozen=True, slots=True)
class WorkerEndpoint:
    """Where to listen for one worker."""

    worker_id: str
    endpoint: str  # the worker's PUB address, e.g. tcp://127.0.0.1:5557 or ipc:///tmp/w0
    resync_endpoint: str = ""  # its ROUTER address; "" = learn it from the worker's reports
    resync: str = "auto"
    hashes: str = "native"  # "tokens": the engine hashes its own way (vLLM, SGLang); see translate
    reports_load: bool = False  # True: it heartbeats load reports (Trident workers); see _check_timers
    curve: CurveKeys | None = None  # a worker on another node: its stream and resync over CURVE

    def validate(self) -> WorkerEndpoint:
        if not self.worker_id:
            raise ConfigError("worker_id must be a non-empty string")
        if not self.endpoint.startswith(("tcp://", "ipc://", "inproc://")):
            raise ConfigError(
                f"endpoint: expected tcp://, ipc:// or inproc://, got {self.endpoint!r}"
            )
        if self.resync not in RESYNC_MODES:
            raise ConfigError(f"resync: expected one of {RESYNC_MODES}, got {self.resync!r}")
        if self.hashes not in HASH_SCHEMES:
            raise ConfigError(f"hashes: expected one of {HASH_SCHEMES}, got {self.hashes!r}")
        return self


class _Conn:
    """Subscriber-thread state of one worker."""

    __slots__ = (
        "spec",
        "sub",
        "dealer",
        "sync",
        "translator",
        "live",
        "last_report",
        "waiting_since",
        "learned",
        "resync_kind",
        "warned",
        "engine_sub",
        "engine_replay",
    )

    def __init__(self, spec: WorkerEndpoint, sub: zmq.Socket, block_size: int) -> None:
        self.spec = spec
        self.translator = (
            HashTranslator(spec.worker_id, block_size) if spec.hashes == "tokens" else None
        )
        self.sub = sub
        self.dealer: zmq.Socket | None = None
        self.sync = StreamSync(spec.worker_id)
        self.live = False
        self.last_report: float | None = None
        self.waiting_since: float | None = None  # subscribed, nothing heard yet (None: not timing)
        self.learned = ""  # resync endpoint the worker announced
        self.resync_kind = ""  # "snapshot" | "replay" | "waiting" while a resync is in flight
        self.warned = False
        # The engine's own KV event stream (vLLM), learned from the worker's reports: its SUB
        # socket and replay endpoint. While set, `sub` carries only load and control.
        self.engine_sub: zmq.Socket | None = None
        self.engine_replay = ""

    def resync_target(self) -> tuple[str, str]:
        """(mode, endpoint) for the next resync; endpoint "" when not known (yet)."""
        mode, spec = self.spec.resync, self.spec
        if self.engine_sub is not None:
            return ("replay", self.engine_replay) if self.engine_replay and mode != "none" else ("none", "")
        if mode == "auto":
            if self.learned:
                return "snapshot", self.learned
            return ("replay", spec.resync_endpoint) if spec.resync_endpoint else ("auto", "")
        if mode == "none":
            return "none", ""
        return mode, spec.resync_endpoint or self.learned


class KvEventSubscriber:
    """Feeds a `KvRouter` from the workers' KV event and load streams.

    Who calls it: the router model (or a test) creates it with the router, calls `start()`,
    `add_worker(...)` / `remove_worker(...)` from any thread as workers come and go, and
    `close()` at shutdown (idempotent; joins the thread and closes every socket). All sockets
    live on the one background thread ("kv-subscriber"); it never blocks on a worker: resync
    replies are awaited in the same poll loop and abandoned after `resync_timeout_s`.
    """

    def __init__(
        self,
        router: KvRouter,
        *,
        worker_timeout_s: float | None = None,
        resync_timeout_s: float | None = None,
        poll_ms: int = 20,
        discover: Callable[[], Iterable[WorkerEndpoint]] | None = None,
        discover_s: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.router = router
        self.worker_timeout_s = worker_timeout_s or router.config.worker_timeout_s
        self.resync_timeout_s = resync_timeout_s or router.config.resync_timeout_s
        self._poll_ms = poll_ms
        self._clock = clock
        self._commands: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._status_lock = threading.Condition()  # notified whenever a status changes
        self._status: dict[str, dict[str, Any]] = {}
        self._discover = discover
        self._discover_s = discover_s
        self._discovered_at = float("-inf")
        self._ctx = zmq.Context()
        self._conns: dict[str, _Conn] = {}
        self._poller = zmq.Poller()
        self._owner: dict[zmq.Socket, _Conn] = {}
        self._thread: threading.Thread | None = None
        self._closed = False

    # ------------------------------------------------------------ public API

    def start(self) -> KvEventSubscriber:
        if self._thread is None and not self._closed:
            self._thread = threading.Thread(target=self._run, name="kv-subscriber", daemon=True)
            self._thread.start()
        return self

    def add_worker(self, spec: WorkerEndpoint) -> None:
        self._commands.put(("add", spec.validate()))

    def remove_worker(self, worker_id: str) -> None:
        """Stop listening to a worker and drop it from the router now."""
        self._commands.put(("remove", worker_id))

    def status(self, worker_id: str | None = None) -> dict[str, Any]:
        """Per-worker sync state: live, next_seq, gaps, resyncs, restarts."""
        with self._status_lock:
            if worker_id is not None:
                return dict(self._status.get(worker_id, {}))
            return {w: dict(s) for w, s in self._status.items()}

    def wait_synced(self, worker_ids: Collection[str], timeout: float) -> bool:
        """Block until every worker in `worker_ids` is synced (see the module docstring) or
        `timeout` seconds pass; True when all are. Request threads call it for workers they
        see for the first time, so the first decision on them sees what they hold."""
        deadline = time.monotonic() + timeout
        with self._status_lock:
            while not all(self._status.get(w, {}).get("synced") for w in worker_ids):
                left = deadline - time.monotonic()
                if left <= 0 or self._closed:
                    return False
                self._status_lock.wait(left)
            return True

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        with self._status_lock:
            self._status_lock.notify_all()  # nobody waits for a sync that will not come
        if self._thread is not None:
            self._thread.join()
        else:
            self._close_sockets()
        self._ctx.term()

    def __enter__(self) -> KvEventSubscriber:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ the thread

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._drain_commands()
                self._run_discovery(self._clock())
                if not self._owner:  # zmq's poll returns at once with no socket to watch
                    self._stop.wait(self._poll_ms / 1000.0)
                    self._check_timers(self._clock())
                    continue
                try:
                    ready = dict(self._poller.poll(self._poll_ms))
                except zmq.ZMQError as exc:
                    logger.warning("kv subscriber: poll failed: %s", exc)
                    time.sleep(0.05)
                    continue
                for sock in ready:
                    conn = self._owner.get(sock)
                    if conn is not None:
                        self._drain(conn, sock)
                self._check_timers(self._clock())
        finally:
            self._close_sockets()

    def _drain_commands(self) -> None:
        while True:
            try:
                op, arg = self._commands.get_nowait()
            except queue.Empty:
                return
            if op == "add":
                self._add(arg)
            else:
                self._remove(arg)

    def _run_discovery(self, now: float) -> None:
        if self._discover is None or now - self._discovered_at < self._discover_s:
            return
        self._discovered_at = now
        try:
            found = list(self._discover())
        except Exception:  # a failing scan must not stop the stream of every known worker
            logger.exception("kv subscriber: worker discovery failed")
            return
        for spec in found:
            if spec.worker_id not in self._conns:
                self._add(spec.validate())

    def _add(self, spec: WorkerEndpoint) -> None:
        old = self._conns.get(spec.worker_id)
        if old is not None:
            if old.spec == spec:
                return
            self._remove(spec.worker_id)
        sub = self._open_sub(spec.endpoint, spec.curve)
        conn = _Conn(spec, sub, self.router.block_size)
        if spec.reports_load:  # it heartbeats from the moment it is ready: time its first word
            conn.waiting_since = self._clock()
        self._conns[spec.worker_id] = conn
        self._owner[sub] = conn
        self._poller.register(sub, zmq.POLLIN)
        self._publish_status(conn)
        logger.info("kv subscriber: listening to worker=%s at %s", spec.worker_id, spec.endpoint)

    def _remove(self, worker_id: str) -> None:
        conn = self._conns.pop(worker_id, None)
        if conn is None:
            return
        self._close_dealer(conn)
        self._close_engine_sub(conn)
        self._poller.unregister(conn.sub)
        self._owner.pop(conn.sub, None)
        conn.sub.close(linger=0)
        self.router.remove_worker(worker_id)
        with self._status_lock:
            self._status.pop(worker_id, None)
            self._status_lock.notify_all()

    def _drain(self, conn: _Conn, sock: zmq.Socket) -> None:
        for _ in range(_MAX_DRAIN):
            if sock.closed:  # a resync reply just finished and closed its socket
                break
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            try:
                if sock is conn.sub or sock is conn.engine_sub:
                    self._on_stream(conn, frames)
                else:
                    self._on_resync_reply(conn, frames)
            except ValidationError as exc:
                logger.warning(
                    "kv subscriber worker=%s: bad message dropped: %s", conn.spec.worker_id, exc
                )
            except Exception:  # keep listening to every other worker whatever one sends
                logger.exception(
                    "kv subscriber worker=%s: message handling failed", conn.spec.worker_id
                )
            if conn.spec.worker_id not in self._conns:
                return
        self._publish_status(conn)

    def _on_stream(self, conn: _Conn, frames: list[bytes]) -> None:
        topic, seq, payload = wire.unpack_frames(frames)
        now = self._clock()
        wid = conn.spec.worker_id
        if topic == wire.TOPIC_LOAD:
            report = wire.decode_load(payload)
            self._seen(conn, report.worker_id, report.block_size, report.resync_endpoint)
            conn.last_report = now
            self.router.update_load(wid, report)
            self._hint(conn, seq, report)
        elif topic == wire.TOPIC_CONTROL:
            message = wire.decode_control(payload)
            if message.kind == wire.LEAVE:
                logger.info("kv subscriber: worker=%s left", wid)
                self._drop(conn)
                return
            self._seen(conn, message.worker_id, message.block_size, message.resync_endpoint)
            self._hint(conn, seq, message)
        else:
            batch = wire.decode_batch(payload)
            self._seen(conn, "", 0, "")
            self._do(conn, conn.sync.on_batch(seq, batch.events))

    def _hint(self, conn: _Conn, seq: int, message: wire.LoadReport | wire.WorkerControl) -> None:
        """A load report or announce: its `seq` hints at the worker's event stream, unless the
        engine publishes that stream itself (then listen there, and only watch restarts)."""
        if not message.events_endpoint:
            self._do(conn, conn.sync.on_hint(seq, message.instance))
            return
        restarted = conn.sync.instance is not None and message.instance != conn.sync.instance
        if conn.engine_sub is None or restarted:
            self._listen_engine(conn, message)
        conn.sync.instance = message.instance

    def _listen_engine(self, conn: _Conn, message: wire.LoadReport | wire.WorkerControl) -> None:
        """(Re)connect to the engine's own stream: a fresh sync, translator and index entry."""
        self._close_engine_sub(conn)
        self.router.clear_worker(conn.spec.worker_id)
        conn.sync.reset()
        conn.resync_kind = ""
        self._close_dealer(conn)
        if message.hashes == "tokens":
            conn.translator = HashTranslator(conn.spec.worker_id, self.router.block_size)
        elif conn.translator is not None:
            conn.translator.clear()
        sub = self._open_sub(message.events_endpoint)
        conn.engine_sub = sub
        conn.engine_replay = message.events_replay_endpoint
        self._owner[sub] = conn
        self._poller.register(sub, zmq.POLLIN)
        # Whatever the engine published before we listened is in its replay buffer.
        conn.sync.begin_resync(self._clock())
        self._request_resync(conn)
        logger.info(
            "kv subscriber: worker=%s engine events at %s (hashes=%s)",
            conn.spec.worker_id, message.events_endpoint, message.hashes or "native",
        )

    def _close_engine_sub(self, conn: _Conn) -> None:
        self._forget(conn.engine_sub)
        conn.engine_sub = None

    def _seen(self, conn: _Conn, reported_id: str, block_size: int, resync_endpoint: str) -> None:
        wid = conn.spec.worker_id
        if not conn.live:
            conn.live = True
            conn.waiting_since = None
            self.router.add_worker(wid)
        if not conn.warned and reported_id and reported_id not in (wid, wid.rpartition("/")[2]):
            conn.warned = True
            logger.warning(
                "kv subscriber: endpoint of worker=%s reports worker_id=%s", wid, reported_id
            )
        if not conn.warned and block_size and block_size != self.router.block_size:
            conn.warned = True
            logger.error(
                "kv subscriber: worker=%s uses block_size %d, router %d: its cache will never match",
                wid,
                block_size,
                self.router.block_size,
            )
        if resync_endpoint and resync_endpoint != conn.learned:
            conn.learned = resync_endpoint
            if conn.resync_kind == "waiting":
                self._request_resync(conn)

    def _do(self, conn: _Conn, actions: Actions) -> None:
        wid = conn.spec.worker_id
        translator = conn.translator
        if actions.clear:
            self.router.clear_worker(wid)
            if translator is not None:
                translator.clear()
        for events in actions.apply:
            if translator is not None:
                events = translator.translate(events)
            self.router.apply_events(wid, events)
        if actions.resync:
            conn.sync.begin_resync(self._clock())
            self._request_resync(conn)

    def _request_resync(self, conn: _Conn) -> None:
        mode, endpoint = conn.resync_target()
        if mode == "none" or (mode != "auto" and not endpoint):
            conn.resync_kind = ""
            self._do(conn, conn.sync.give_up("no resync endpoint"))
            return
        if mode == "auto":
            conn.resync_kind = "waiting"  # until the worker tells us its resync endpoint
            return
        self._close_dealer(conn)
        dealer = self._ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        if conn.spec.curve is not None:
            conn.spec.curve.connect_as_client(dealer)
        dealer.connect(endpoint)
        conn.dealer = dealer
        self._owner[dealer] = conn
        self._poller.register(dealer, zmq.POLLIN)
        conn.resync_kind = mode
        if mode == "snapshot":
            dealer.send_multipart([b"", wire.SNAPSHOT])
        else:
            dealer.send_multipart([b"", (conn.sync.next_seq or 0).to_bytes(8, "big")])
        logger.info(
            "kv subscriber: worker=%s %s requested from %s", conn.spec.worker_id, mode, endpoint
        )

    def _on_resync_reply(self, conn: _Conn, frames: list[bytes]) -> None:
        if not conn.sync.resyncing or not frames or frames[0] != b"":
            return
        body = frames[1:]
        if conn.resync_kind == "replay" and len(body) == 3:  # vLLM >= 0.32: [topic, seq, payload]
            body = body[1:]
        if conn.resync_kind == "snapshot" and len(body) == 3 and body[0] == wire.SNAPSHOT:
            batch = wire.decode_batch(body[2])
            self._finish_resync(
                conn, conn.sync.on_snapshot(int.from_bytes(body[1], "big"), batch.events)
            )
        elif len(body) == 2 and body[0] == wire.END_SEQ:
            if conn.resync_kind == "replay":
                self._finish_resync(conn, conn.sync.on_replay_end())
            else:
                self._finish_resync(conn, conn.sync.give_up("worker has no snapshot"))
        elif conn.resync_kind == "replay" and len(body) == 2 and len(body[0]) == 8:
            conn.sync.on_replay_batch(
                int.from_bytes(body[0], "big"), wire.decode_batch(body[1]).events
            )
        else:
            logger.warning(
                "kv subscriber worker=%s: unexpected resync reply (%d frames)",
                conn.spec.worker_id,
                len(body),
            )

    def _finish_resync(self, conn: _Conn, actions: Actions) -> None:
        conn.resync_kind = ""
        self._close_dealer(conn)
        self._do(conn, actions)

    def _drop(self, conn: _Conn) -> None:
        """The worker left or went silent: out of the router; rejoins on its next message."""
        self._close_dealer(conn)
        self._close_engine_sub(conn)
        conn.live = False
        conn.last_report = None
        conn.resync_kind = ""
        conn.sync.reset()
        if conn.translator is not None:
            conn.translator.clear()
        self.router.remove_worker(conn.spec.worker_id)
        self._publish_status(conn)

    def _check_timers(self, now: float) -> None:
        for conn in list(self._conns.values()):
            if conn.sync.resyncing and now - conn.sync.resync_started > self.resync_timeout_s:
                kind = conn.resync_kind or "resync"
                self._finish_resync(
                    conn, conn.sync.give_up(f"no {kind} answer in {self.resync_timeout_s}s")
                )
                self._publish_status(conn)
            if (
                conn.live
                and conn.last_report is not None
                and now - conn.last_report > self.worker_timeout_s
            ):
                logger.warning(
                    "kv subscriber: worker=%s sent no load report for %.1fs; dropping it",
                    conn.spec.worker_id,
                    now - conn.last_report,
                )
                self._drop(conn)
            elif conn.waiting_since is not None and now - conn.waiting_since > self.worker_timeout_s:
                # ready in Triton but silent since we subscribed (died before its first report)
                logger.warning(
                    "kv subscriber: worker=%s has not reported in %.1fs since subscribing; routing elsewhere",
                    conn.spec.worker_id,
                    now - conn.waiting_since,
                )
                conn.waiting_since = None
                self.router.remove_worker(conn.spec.worker_id)

    # ------------------------------------------------------------ sockets and status

    def _open_sub(self, endpoint: str, curve: CurveKeys | None = None) -> zmq.Socket:
        sub = self._ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.RCVHWM, 100_000)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        if curve is not None:
            curve.connect_as_client(sub)
        sub.connect(endpoint)
        return sub

    def _forget(self, sock: zmq.Socket | None) -> None:
        """Stop polling a worker's extra socket (dealer, engine stream) and close it."""
        if sock is not None:
            self._poller.unregister(sock)
            self._owner.pop(sock, None)
            sock.close(linger=0)

    def _close_dealer(self, conn: _Conn) -> None:
        self._forget(conn.dealer)
        conn.dealer = None

    def _close_sockets(self) -> None:
        for conn in list(self._conns.values()):
            self._close_dealer(conn)
            self._close_engine_sub(conn)
            conn.sub.close(linger=0)
        self._conns.clear()
        self._owner.clear()

    def _publish_status(self, conn: _Conn) -> None:
        sync = conn.sync
        with self._status_lock:
            self._status[conn.spec.worker_id] = {
                "live": conn.live,
                "next_seq": sync.next_seq,
                "resyncing": sync.resyncing,
                "gaps": sync.gaps,
                "resyncs": sync.resyncs,
                "restarts": sync.restarts,
                "synced": conn.live and sync.next_seq is not None and not sync.resyncing,
            }
            self._status_lock.notify_all()
