"""Draining markers: how the planner tells the router to stop sending a worker new requests.

A worker about to be removed is marked draining by a file `<dir>/<worker>.draining` in the
server's private run directory (the one its workers publish KV events in,
`trident.core.endpoints.events_dir`: 0700, owned by the server's user, so only that user can
drain a worker). The planner's Triton connector writes the marker, waits until the worker
has no request left, unloads it and removes the marker; the router's `WorkerDirectory`
leaves marked workers out of every selection (it re-reads the directory at most every
`DrainMarkers.check_s`). Requests already on the worker run to completion.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from trident.core.endpoints import check_worker_name

SUFFIX = ".draining"


def marker_path(directory: Path, worker: str) -> Path:
    return directory / (check_worker_name(worker) + SUFFIX)


def mark_draining(directory: Path, worker: str) -> None:
    """Create the marker (0600); idempotent."""
    path = marker_path(directory, worker)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.close(fd)


def clear_draining(directory: Path, worker: str) -> None:
    """Remove the marker; idempotent."""
    with contextlib.suppress(FileNotFoundError):
        marker_path(directory, worker).unlink()


def draining_workers(directory: Path) -> frozenset[str]:
    """Workers marked draining in `directory` (empty if it does not exist)."""
    try:
        names = os.listdir(directory)
    except OSError:
        return frozenset()
    return frozenset(n[: -len(SUFFIX)] for n in names if n.endswith(SUFFIX))


class DrainMarkers:
    """A cached view of the markers in one directory; thread-safe. Called as a function:
    `markers()` -> the draining workers, re-read at most every `check_s`."""

    def __init__(self, directory: Path, check_s: float = 0.2, clock: Callable[[], float] = time.monotonic) -> None:
        self.directory = directory
        self.check_s = check_s
        self.clock = clock
        self._cached: frozenset[str] = frozenset()
        self._checked = float("-inf")
        self._lock = threading.Lock()

    def __call__(self) -> frozenset[str]:
        now = self.clock()
        with self._lock:
            if now - self._checked >= self.check_s:
                self._cached, self._checked = draining_workers(self.directory), now
            return self._cached
