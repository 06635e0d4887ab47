"""The glue between a decoupled worker model (`decode`, `prefill` and their replicas) and an engine.

Threads:
- Triton's model thread calls `execute(requests)`: each request is parsed, registered and
  submitted to the engine (or answered at once with an error); `execute` never blocks.
- The engine's loop thread calls the per-request sink with each `TokenChunk`: it sends one
  Triton response per chunk through the request's response sender (the last with
  `COMPLETE_FINAL`) and records timings. It never blocks and never calls back into the
  engine: aborts it needs go to a queue.
- A response send that does not return within `SEND_STUCK_S` marks the worker wedged
  (Triton 2.51 blocks a send to a BLS requester whose stub was killed, for good): its load
  reports stop, so routers drop it and migrate what it was serving. The watchdog thread
  (owned here) ends the stub process once a send has been stuck for `SEND_WEDGED_S`: the
  engine thread can never run again, and the launcher's supervisor loads a dead stub's
  model again (`trident.supervisor`), whose new KV pool removes the old one's segments.
- The poller thread (owned here) aborts requests whose client cancelled (`is_cancelled()`)
  or whose response could not be sent, and flushes metrics from `engine.stats()`. It makes
  no `pb` call before Triton's first `execute`: a stub whose own thread called into
  `pb_utils` while `initialize` was still running has aborted (the router's, with
  boost::interprocess::lock_exception), so until then the poller only forwards aborts.

The engine owns its KV pool; this class owns only the map of in-flight requests.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from plugins.base import Engine
from plugins.triton.engines import build_engine
from plugins.triton.events import WorkerEvents
from plugins.triton.metrics import WorkerMetrics
from trident.core import tracing
from trident.core.errors import TridentError, ValidationError
from trident.core.names import parse_replica
from trident.core.settings import model_parameters
from trident.core.triton_io import (
    close_quietly,
    read_inputs,
    response,
    send_final_error,
    setup_logging,
)
from trident.core.types import FINISH_ERROR, GenerateRequest, TokenChunk
from trident.core.worker_io import (
    WORKER_INPUTS,
    AbortCommand,
    encode_chunk_outputs,
    parse_generate_inputs,
)

logger = logging.getLogger(__name__)

SEND_STUCK_S = 5.0  # a response send this long in progress: the worker cannot deliver
SEND_WEDGED_S = 20.0  # ... and this long: it never will; the stub exits to be restarted
WEDGED_EXIT_CODE = 70  # EX_SOFTWARE


@dataclass(slots=True)
class _InFlight:
    request: Any  # pb_utils.InferenceRequest (kept for is_cancelled())
    sender: Any  # its response sender
    start: float
    last: float = 0.0
    generated: int = 0
    aborted: bool = False
    closed: bool = False  # the final response is being / has been sent
    # Serializes is_cancelled() (poller) against the final send (engine thread): once the
    # final response is out, Triton releases the request and asking about it is invalid.
    lock: threading.Lock = field(default_factory=threading.Lock)
    span: Any = None  # this hop's trace span (trident.core.tracing), ended by the last chunk
    transfer: Any = None  # decode after a remote prefill: the KV pull, to the first token


def worker_from_args(pb: Any, args: Mapping[str, Any]) -> WorkerModel:
    """`initialize` of the decode and prefill models (their model.py, which pass in the
    stub's `triton_python_backend_utils` as `pb`): logging, parameters, engine, metrics and
    KV-event publishing for this instance. Returns the started worker; the model's
    `finalize` calls its `shutdown()`."""
    name = args["model_name"]
    setup_logging(pb, name)
    params = model_parameters(json.loads(args["model_config"]))
    events = WorkerEvents.from_params(name, params)
    engine = build_engine(name, params, args)
    worker = WorkerModel(pb, name, engine, WorkerMetrics(pb, name), events=events)
    worker.start()
    return worker


class WorkerModel:
    """One worker model instance (decode or prefill: the role is only in the requests it gets
    and its engine settings) serving one engine. See the module docstring for threads."""

    def __init__(
        self,
        pb: Any,
        name: str,
        engine: Engine,
        metrics: WorkerMetrics | None = None,
        poll_s: float = 0.05,
        events: WorkerEvents | None = None,
    ) -> None:
        self.pb = pb
        self.name = name
        self.engine = engine
        self.metrics = metrics
        self.events = events  # KV events + load for the router (plugins.triton.events)
        self.poll_s = poll_s
        self._inflight: dict[str, _InFlight] = {}
        self._lock = threading.Lock()
        self._to_abort: collections.deque[str] = collections.deque()
        self._stop = threading.Event()
        self._serving = threading.Event()  # set by the first execute: initialize has returned
        self._send_started = 0.0  # monotonic time of the send in progress (engine thread), 0: none
        self._reported_stuck = False
        if events is not None:
            events.healthy = self.delivering
        self._poller = threading.Thread(target=self._poll_loop, name=f"{name}-poller", daemon=True)
        self._watchdog = threading.Thread(target=self._watch_sends, name=f"{name}-watchdog", daemon=True)
        self.on_wedged: Any = lambda: os._exit(WEDGED_EXIT_CODE)  # tests replace it
        tracing.configure(f"trident-{name}")  # on only with an OTLP endpoint in the environment

    def start(self) -> None:
        try:
            self.engine.start()
        except BaseException:
            self.engine.shutdown()  # safe on a half-started engine
            raise
        info = self.engine.info()
        logger.info(
            "worker=%s ready: model=%s device=%s blocks=%d x %d tokens, max_model_len=%d",
            self.name, info.model_id, info.device, info.num_blocks, info.block_size, info.max_model_len,
        )
        if self.events is not None:
            try:
                self.events.start(self.engine)
            except BaseException:
                self.engine.shutdown()
                raise
        if self.metrics is not None:
            # On initialize's own thread: a replacement for a killed stub inherits the dead
            # one's metrics (same labels), stale until the poller's first flush.
            self.metrics.flush(self.engine.stats(), inflight=0)
        self._poller.start()
        self._watchdog.start()

    def execute(self, requests: list[Any]) -> None:
        self._serving.set()
        for request in requests:
            sender = request.get_response_sender()
            try:
                self._submit(request, sender)
            except TridentError as exc:
                send_final_error(self.pb, sender, exc)
            except Exception as exc:  # an engine bug must not kill the model instance
                logger.exception("worker=%s: failed to submit a request", self.name)
                send_final_error(self.pb, sender, f"internal error in worker {self.name}: {exc}")

    def _submit(self, request: Any, sender: Any) -> None:
        arrays = read_inputs(self.pb, request, WORKER_INPUTS.names)
        parsed = parse_generate_inputs(arrays, request.request_id() or uuid.uuid4().hex)
        if isinstance(parsed, AbortCommand):
            self.engine.abort(parsed.request_id)
            close_quietly(self.pb, sender)
            return
        vocab = self.engine.info().vocab_size
        if parsed.first_token is not None and parsed.first_token >= vocab:
            raise ValidationError("first_token", f"token id {parsed.first_token} outside the vocabulary [0, {vocab})")
        with self._lock:
            if parsed.request_id in self._inflight:
                raise ValidationError("request_id", f"{parsed.request_id!r} is already running on {self.name}")
            entry = self._inflight[parsed.request_id] = _InFlight(request, sender, time.monotonic())
        if tracing.enabled():
            self._trace(entry, request, parsed)
        try:
            self.engine.submit(parsed, self._sink)
        except BaseException:
            with self._lock:
                entry = self._inflight.pop(parsed.request_id, None)
            if entry is not None:
                with entry.lock:
                    entry.closed = True  # execute() sends the error response
            raise
        if self.metrics is not None:
            self.metrics.record_request(len(parsed.input_ids))

    def _sink(self, chunk: TokenChunk) -> None:
        """Engine thread: forward one chunk to the client."""
        now = time.monotonic()
        with self._lock:
            entry = self._inflight.get(chunk.request_id)
            if entry is not None and chunk.finished:
                del self._inflight[chunk.request_id]
        if entry is None:
            return
        self._record_timing(entry, chunk, now)
        pb = self.pb
        flags = pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL if chunk.finished else 0
        try:
            if chunk.finished:
                with entry.lock:
                    entry.closed = True
                    self._send(entry, chunk, flags)
            else:
                self._send(entry, chunk, flags)
        except Exception as exc:  # the client went away: stop generating for it
            logger.info("worker=%s request_id=%s: send failed (%s); aborting", self.name, chunk.request_id, exc)
            if not chunk.finished:
                self._to_abort.append(chunk.request_id)

    def _send(self, entry: _InFlight, chunk: TokenChunk, flags: int) -> None:
        self._send_started = time.monotonic()
        try:
            if chunk.finish_reason == FINISH_ERROR:
                send_final_error(self.pb, entry.sender, chunk.error or f"worker {self.name}: engine error")
            else:
                pb = self.pb
                entry.sender.send(response(pb, encode_chunk_outputs(chunk)), flags=flags)
        finally:
            self._send_started = 0.0

    def delivering(self) -> bool:
        """Any thread: False while a response send has been stuck for `SEND_STUCK_S`."""
        started = self._send_started
        stuck = bool(started) and time.monotonic() - started > SEND_STUCK_S
        if stuck and not self._reported_stuck:
            logger.warning("worker=%s: a response send is stuck; no more load reports", self.name)
        self._reported_stuck = stuck
        return not stuck

    def _watch_sends(self) -> None:
        """Watchdog thread: end the process once a send has been stuck for `SEND_WEDGED_S`.
        (The poller cannot do it: its own `pb` calls may block behind the stuck send.)"""
        while not self._stop.wait(1.0):
            started = self._send_started
            if started and time.monotonic() - started > SEND_WEDGED_S:
                logger.error(
                    "worker=%s: a response send has been stuck for %.0f s; exiting so that the "
                    "model is loaded again", self.name, SEND_WEDGED_S,
                )
                self.on_wedged()
                return

    def _trace(self, entry: _InFlight, request: Any, parsed: GenerateRequest) -> None:
        """Request thread: open this hop's span under the caller's (the BLS `traceparent`)."""
        parent = json.loads(request.parameters() or "{}").get(tracing.TRACEPARENT)
        role = (parse_replica(self.name) or ("worker", 0))[0]
        attributes = {"request_id": parsed.request_id, "worker": self.name, "prompt_tokens": len(parsed.input_ids)}
        entry.span = tracing.start(role, parent if isinstance(parent, str) else None, **attributes)
        if parsed.kv_descriptor is not None:
            entry.transfer = tracing.start("kv_transfer", tracing.traceparent(entry.span), **attributes)

    def _record_timing(self, entry: _InFlight, chunk: TokenChunk, now: float) -> None:
        if entry.transfer is not None and (chunk.output_ids or chunk.finished):
            tracing.end(entry.transfer)  # the pulled KV was in place: a token came from it
            entry.transfer = None
        if entry.span is not None and chunk.finished:
            tracing.end(entry.span, chunk.error if chunk.finish_reason == FINISH_ERROR else "")
        n = len(chunk.output_ids)
        if self.metrics is not None and n:
            if entry.generated == 0:
                self.metrics.record_ttft(now - entry.start)
                if n > 1:
                    self.metrics.record_itl(0.0, n - 1)
            else:
                self.metrics.record_itl((now - entry.last) / n, n)
        entry.generated += n
        if n:
            entry.last = now
        if chunk.finished and self.metrics is not None:
            self.metrics.record_finished(entry.generated)

    def _poll_loop(self) -> None:
        """Poller thread: abort cancelled requests, flush metrics."""
        next_flush = 0.0
        while not self._stop.wait(self.poll_s):
            while self._to_abort:
                self.engine.abort(self._to_abort.popleft())
            if not self._serving.is_set():
                continue  # no pb call yet (see the module docstring)
            with self._lock:
                entries = list(self._inflight.items())
            for request_id, entry in entries:
                if entry.aborted:
                    continue
                with entry.lock:
                    if entry.closed:
                        continue
                    try:
                        cancelled = entry.request.is_cancelled()
                    except Exception:  # the request is already gone on the server side
                        cancelled = True
                if cancelled:
                    entry.aborted = True
                    logger.info("worker=%s request_id=%s cancelled by the client", self.name, request_id)
                    self.engine.abort(request_id)
            now = time.monotonic()
            if self.metrics is not None and now >= next_flush:
                self.metrics.flush(self.engine.stats(), inflight=len(entries))
                next_flush = now + 0.25

    def shutdown(self) -> None:
        """Leave the router, stop polling, then shut the engine down (which finishes requests
        with "abort")."""
        if self.events is not None:
            self.events.close()
        self._stop.set()
        if self._poller.is_alive():
            self._poller.join(timeout=5)
        if self._watchdog.is_alive():
            self._watchdog.join(timeout=5)
        self.engine.shutdown()
        tracing.shutdown()
        if self.metrics is not None:
            self.metrics.close()
