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
from collections.abc import Callable
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
    __slots__ = ("report", "received", "pending", "pending_prefill", "pending_blocks")

    def __init__(self) -> None:
        self.report: LoadReport | None = None
        self.received = 0.0
        self.pending: deque[list] = deque()  # [assigned_at, prefill_blocks, blocks, request_id]
        self.pending_prefill = 0
        self.pending_blocks = 0


class LoadTable:
    """Last load report per worker plus pending assignments.

    Who calls it: the subscriber thread (`update`, `remove`) and the router's `decide` on
    request threads (`view`, `assign`). One lock; nothing blocks.
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
        self._requests: dict[str, str] = {}  # request id -> worker, while pending

    def update(self, worker_id: str, report: LoadReport) -> None:
        now = self._clock()
        with self._lock:
            entry = self._entries.setdefault(worker_id, _Entry())
            entry.report = report
            entry.received = now
            self._expire(entry, now - self.grace_s, self._requests)

    def assign(
        self, worker_id: str, prefill_blocks: int, blocks: int, request_id: str | None = None
    ) -> None:
        now = self._clock()
        with self._lock:
            entry = self._entries.setdefault(worker_id, _Entry())
            entry.pending.append([now, prefill_blocks, blocks, request_id])
            entry.pending_prefill += prefill_blocks
            entry.pending_blocks += blocks
            if request_id is not None:
                self._requests[request_id] = worker_id

    def release(self, request_id: str) -> None:
        """Stop counting a request that finished before a report absorbed it."""
        with self._lock:
            worker_id = self._requests.pop(request_id, None)
            entry = None if worker_id is None else self._entries.get(worker_id)
            if entry is None:
                return
            for item in entry.pending:
                if item[3] == request_id:
                    entry.pending_prefill -= item[1]
                    entry.pending_blocks -= item[2]
                    item[1] = item[2] = 0
                    item[3] = None
                    return

    def view(self, worker_id: str) -> WorkerLoad:
        now = self._clock()
        with self._lock:
            entry = self._entries.get(worker_id)
            if entry is None:
                return WorkerLoad(0, 0)
            self._expire(entry, now - self.max_age_s, self._requests)
            report = entry.report
            if report is None:
                return WorkerLoad(entry.pending_blocks, entry.pending_prefill)
            backlog = -(-report.active_prefill_tokens // self.block_size)
            return WorkerLoad(
                active_blocks=report.active_blocks + entry.pending_blocks,
                prefill_blocks=backlog + entry.pending_prefill,
                running=report.running,
                waiting=report.waiting,
                total_blocks=report.total_blocks,
            )

    def report(self, worker_id: str) -> LoadReport | None:
        with self._lock:
            entry = self._entries.get(worker_id)
            return None if entry is None else entry.report

    def remove(self, worker_id: str) -> None:
        with self._lock:
            entry = self._entries.pop(worker_id, None)
            if entry is not None:
                for item in entry.pending:
                    if item[3] is not None:
                        self._requests.pop(item[3], None)

    @staticmethod
    def _expire(entry: _Entry, before: float, requests: dict[str, str]) -> None:
        pending = entry.pending
        while pending and pending[0][0] <= before:
            _, prefill_blocks, blocks, request_id = pending.popleft()
            entry.pending_prefill -= prefill_blocks
            entry.pending_blocks -= blocks
            if request_id is not None:
                requests.pop(request_id, None)
