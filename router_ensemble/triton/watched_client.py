"""A `WorkerClient` that ends a stream whose worker went away, instead of waiting forever.

When a worker's stub process dies, Triton 2.51 never answers the BLS streams that were open
to it: the router's request thread would block for good and the client would hang. So the
worker's chunks are read by a helper thread ("bls-<request>") into a queue, and the request
thread waits on the queue in `poll_s` slices. Between slices it asks the `KvRouter` whether
the worker was removed since the request started (it left, or its load reports stopped for
`worker_timeout_s`, or it was unloaded); once that is so and the stream has also been silent
for `stall_s`, the request ends with `WorkerUnavailable` naming the worker. A worker that
still streams tokens is never cut off, whatever the router thinks of it.

Closing the stream early (stop string, client cancel) asks the worker to abort at once
(`inner.abort` when the inner client has it), then waits for the helper to finish, as the
`WorkerClient` contract asks; a dead worker's helper is left behind (daemon thread).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from trident.core.errors import WorkerUnavailable
from trident.core.types import GenerateRequest, TokenChunk

if TYPE_CHECKING:
    from router_ensemble.orchestration.orchestrator import WorkerClient

logger = logging.getLogger(__name__)

_END = object()


class WatchedWorkerClient:
    """Wraps another `WorkerClient` (BLS in production). Stateless; any request thread.

    `removals(worker)` is `KvRouter.removals`: a counter that changes when the worker is
    removed from routing.
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

    def generate(self, worker: str, request: GenerateRequest) -> Iterator[TokenChunk]:
        epoch = self.removals(worker)
        items: queue.SimpleQueue[object] = queue.SimpleQueue()
        stop = threading.Event()
        pump = threading.Thread(
            target=self._pump, args=(worker, request, items, stop), name=f"bls-{request.request_id[:12]}", daemon=True
        )  # a daemon: the helper of a dead worker's stream never returns
        pump.start()
        last = time.monotonic()
        finished = gone = False
        try:
            while True:
                try:
                    item = items.get(timeout=self.poll_s)
                except queue.Empty:
                    silent = time.monotonic() - last
                    if silent >= self.stall_s and self.removals(worker) != epoch:
                        gone = True  # nothing to abort or wait for
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
                self._end_stream(worker, request, pump, stop, epoch, abort=not finished)

    def _pump(
        self, worker: str, request: GenerateRequest, items: queue.SimpleQueue[object], stop: threading.Event
    ) -> None:
        """Helper thread: move the inner stream's chunks to the queue; closing it aborts."""
        stream = self.inner.generate(worker, request)
        try:
            for chunk in stream:
                items.put(chunk)
                if chunk.finished or stop.is_set():
                    break
        except BaseException as exc:  # handed to the request thread
            items.put(exc)
        finally:
            close = getattr(stream, "close", None)
            try:
                if close is not None:
                    close()
            except Exception as exc:
                logger.warning("worker=%s request_id=%s: closing the stream: %s", worker, request.request_id, exc)
            items.put(_END)

    def _end_stream(
        self, worker: str, request: GenerateRequest, pump: threading.Thread, stop: threading.Event, epoch: int, abort: bool
    ) -> None:
        """Abort if asked, then wait until the helper has drained and closed the inner stream,
        so that a closed stream has ended (the `WorkerClient` contract) and no BLS stream
        outlives the router request that opened it."""
        if abort:
            stop.set()
            abort_fn = getattr(self.inner, "abort", None)
            if abort_fn is not None:
                abort_fn(worker, request.request_id)
        deadline = time.monotonic() + self.close_timeout_s
        while pump.is_alive() and time.monotonic() < deadline:
            pump.join(self.poll_s)
            if self.removals(worker) != epoch:
                break
        if pump.is_alive():
            logger.warning("worker=%s request_id=%s: stream did not end", worker, request.request_id)
