"""A `WorkerClient` that ends a stream whose worker went away, instead of waiting forever.

When a worker's stub process dies, Triton 2.51 never answers the BLS streams that were open
to it: the router's request thread would block for good and the client would hang. So the
worker's chunks are read by a helper thread into a queue, and the request thread waits on
the queue in `poll_s` slices. Between slices it asks the pool's `KvRouter` whether the worker
was removed since the request started (it left, or its load reports stopped for
`worker_timeout_s`, or it was unloaded); once that is so and the stream has also been silent
for `stall_s`, the request ends with `WorkerUnavailable` naming the worker. A worker that
still streams tokens is never cut off, whatever the router thinks of it.

Helper threads are daemons kept in a small pool (`_Pumps`) and reused across streams, so a
stream costs a queue hand-off, not a thread start; the helper of a dead worker's stream never
returns and is simply never reused.

Closing the stream early (stop string, client cancel) asks the worker to abort at once
(`inner.abort`), then waits for the helper to finish, as the `WorkerClient` contract asks.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

from router_ensemble.orchestration.ports import ChunkStream, WorkerClient
from trident.core import tracing
from trident.core.errors import WorkerUnavailable
from trident.core.types import GenerateRequest, TokenChunk

logger = logging.getLogger(__name__)

_END = object()


class _Pumps:
    """Daemon threads that run one job at a time and wait `idle_s` for the next."""

    def __init__(self, idle_s: float = 60.0) -> None:
        self.idle_s = idle_s
        self._jobs: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._idle = 0
        self._lock = threading.Lock()

    def submit(self, job: Callable[[], None]) -> None:
        with self._lock:
            start = self._idle == 0
            if not start:
                self._idle -= 1  # that thread takes this job
        self._jobs.put(job)
        if start:
            threading.Thread(target=self._run, name="bls-pump", daemon=True).start()

    def _run(self) -> None:
        while True:
            try:
                job = self._jobs.get(timeout=self.idle_s)
            except queue.Empty:
                with self._lock:
                    if self._idle > 0 and self._jobs.empty():
                        self._idle -= 1
                        return
                continue
            try:
                job()
            except BaseException:  # a job reports its own errors; keep the thread
                logger.exception("bls pump job failed")
            with self._lock:
                self._idle += 1


_PUMPS = _Pumps()


class WatchedWorkerClient:
    """Wraps another `WorkerClient` (BLS in production). Stateless; any request thread.

    `removals(worker)` is the pool's `KvRouter.removals`: a counter that changes when the
    worker is removed from routing.
    """

    def __init__(
        self,
        inner: WorkerClient,
        removals: Callable[[str], int],
        *,
        poll_s: float = 0.25,
        stall_s: float = 1.0,
        close_timeout_s: float = 30.0,
    ) -> None:
        self.inner = inner
        self.removals = removals
        self.poll_s = poll_s
        self.stall_s = stall_s
        self.close_timeout_s = close_timeout_s

    def abort(self, worker: str, request_id: str) -> None:
        self.inner.abort(worker, request_id)

    def generate(self, worker: str, request: GenerateRequest) -> ChunkStream:
        epoch = self.removals(worker)
        items: queue.SimpleQueue[object] = queue.SimpleQueue()
        stop = threading.Event()
        done = threading.Event()
        context = tracing.capture()  # the request's trace continues on the helper thread
        _PUMPS.submit(lambda: tracing.run_in(context, self._pump, worker, request, items, stop, done))
        last = time.monotonic()
        finished = gone = False
        try:
            while True:
                try:
                    item = items.get(timeout=self.poll_s)
                except queue.Empty:
                    silent = time.monotonic() - last
                    if silent >= self.stall_s and self.removals(worker) != epoch:
                        gone = True  # nothing to wait for; a frozen worker that resumes
                        stop.set()  # sends its next chunk to the helper, which then aborts
                        raise WorkerUnavailable(
                            f"worker {worker} went away while serving request {request.request_id} "
                            f"(no response for {silent:.1f}s)"
                        ) from None
                    continue
                if item is _END:
                    finished = True
                    return
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                assert isinstance(item, TokenChunk)
                last = time.monotonic()
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not gone:
                self._end_stream(worker, request, done, stop, epoch, abort=not finished)

    def _pump(
        self,
        worker: str,
        request: GenerateRequest,
        items: queue.SimpleQueue[object],
        stop: threading.Event,
        done: threading.Event,
    ) -> None:
        """Helper thread: move the inner stream's chunks to the queue; closing it aborts."""
        try:
            stream = self.inner.generate(worker, request)
            try:
                for chunk in stream:
                    items.put(chunk)
                    if chunk.finished or stop.is_set():
                        break
            finally:
                stream.close()
        except BaseException as exc:  # handed to the request thread
            items.put(exc)
        finally:
            items.put(_END)
            done.set()

    def _end_stream(
        self, worker: str, request: GenerateRequest, done: threading.Event, stop: threading.Event, epoch: int,
        abort: bool,
    ) -> None:
        """Abort if asked, then wait until the helper has drained and closed the inner stream,
        so that a closed stream has ended (the `WorkerClient` contract) and no BLS stream
        outlives the router request that opened it."""
        if abort:
            stop.set()
            self.inner.abort(worker, request.request_id)
        deadline = time.monotonic() + self.close_timeout_s
        while not done.wait(self.poll_s) and time.monotonic() < deadline:
            if self.removals(worker) != epoch:
                break
        if not done.is_set():
            logger.warning("worker=%s request_id=%s: stream did not end", worker, request.request_id)
