"""Per-worker load as the router sees it: the last load report plus the router's own recent
assignments that the report cannot reflect yet.

Workers report every ~0.5 s. A burst of requests between two reports would otherwise all see
the same numbers and all go to the same worker, so each decision is recorded as *pending*
(the request's uncached blocks, as prefill work and as new KV memory) and counted on top of the report
until a report received at least `grace_s` after the assignment arrives (by then the engine
has queued the request and counts it itself), the request is released (it finished), or
`max_age_s` passes (no reports at all).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from kv_manager.wire import LoadReport


@dataclass(frozen=True, slots=True)
class WorkerLoad:
    """What a policy sees of one worker's load, in blocks."""

    active_blocks: int  # decode load: blocks in use, plus pending assignments
    prefill_blocks: int  # prefill backlog: active prefill tokens / block size, plus pending
    running: int = 0
    waiting: int = 0
    total_blocks: int = 0


class _Entry:
    __slots__ = ("report", "received", "pending", "pending_prefill", "pending_blocks", "view")

    def __init__(self) -> None:
        self.report: LoadReport | None = None
        self.received = 0.0
        self.pending: deque[list] = deque()  # [assigned_at, prefill_blocks, blocks, request_id]
        self.pending_prefill = 0
        self.pending_blocks = 0
        self.view: WorkerLoad | None = None  # cached; None after any change


class LoadTable:
    """Last load report per worker plus pending assignments.

    Who calls it: the subscriber thread (`update`, `remove`) and the router's `decide` on
    request threads (`views`, `assign`), the orchestration (`release`). One lock; nothing
    blocks. Every call is O(1) per worker, whatever the number of pending requests.
    """

    def __init__(
        self,
        *,
        block_size: int,
        grace_s: float = 0.1,
        max_age_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.block_size = block_size
        self.grace_s = grace_s
        self.max_age_s = max_age_s
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}
        self._requests: dict[str, tuple[_Entry, list]] = {}  # request id -> its pending item

    def update(self, worker_id: str, report: LoadReport) -> None:
        now = self._clock()
        with self._lock:
            entry = self._entries.setdefault(worker_id, _Entry())
            entry.report = report
            entry.received = now
            entry.view = None
            self._expire(entry, now - self.grace_s)

    def assign(
        self, worker_id: str, prefill_blocks: int, blocks: int, request_id: str | None = None
    ) -> None:
        now = self._clock()
        with self._lock:
            entry = self._entries.setdefault(worker_id, _Entry())
            item = [now, prefill_blocks, blocks, request_id]
            entry.pending.append(item)
            entry.pending_prefill += prefill_blocks
            entry.pending_blocks += blocks
            entry.view = None
            if request_id is not None:
                self._requests[request_id] = (entry, item)

    def release(self, request_id: str) -> None:
        """Stop counting a request that finished before a report absorbed it."""
        with self._lock:
            found = self._requests.pop(request_id, None)
            if found is None:
                return
            entry, item = found
            entry.pending_prefill -= item[1]
            entry.pending_blocks -= item[2]
            entry.view = None
            item[1] = item[2] = 0  # the item itself leaves the queue when it expires
            item[3] = None

    def view(self, worker_id: str) -> WorkerLoad:
        return self.views((worker_id,))[0]

    def views(self, worker_ids: Iterable[str]) -> list[WorkerLoad]:
        """The load of each worker, in order (one clock read and one lock for all)."""
        now = self._clock()
        with self._lock:
            entries = self._entries
            before = now - self.max_age_s
            out = []
            for worker_id in worker_ids:
                entry = entries.get(worker_id)
                if entry is None:
                    out.append(_IDLE)
                    continue
                pending = entry.pending
                if pending and pending[0][0] <= before:
                    self._expire(entry, before)
                out.append(entry.view or self._view(entry))
            return out

    def report(self, worker_id: str) -> LoadReport | None:
        with self._lock:
            entry = self._entries.get(worker_id)
            return None if entry is None else entry.report

    def remove(self, worker_id: str) -> None:
        with self._lock:
            entry = self._entries.pop(worker_id, None)
            if entry is not None:
                for item in entry.pending:
                    self._forget(item)

    # ------------------------------------------------------------ internals (lock held)

    def _view(self, entry: _Entry) -> WorkerLoad:
        report = entry.report
        if report is None:
            view = WorkerLoad(entry.pending_blocks, entry.pending_prefill)
        else:
            view = WorkerLoad(  # positional: cheaper, built once per change of the entry
                report.active_blocks + entry.pending_blocks,
                -(-report.active_prefill_tokens // self.block_size) + entry.pending_prefill,
                report.running,
                report.waiting,
                report.total_blocks,
            )
        entry.view = view
        return view

    def _expire(self, entry: _Entry, before: float) -> None:
        pending = entry.pending
        while pending and pending[0][0] <= before:
            item = pending.popleft()
            entry.pending_prefill -= item[1]
            entry.pending_blocks -= item[2]
            entry.view = None
            self._forget(item)

    def _forget(self, item: list) -> None:
        request_id = item[3]
        # a reused request id may name a newer item by now: drop the entry only if it is ours
        if request_id is not None and self._requests.get(request_id, (None, None))[1] is item:
            del self._requests[request_id]


_IDLE = WorkerLoad(0, 0)
