"""Polling helpers shared by the tests (threads, sockets and servers settle asynchronously)."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_for(
    predicate: Callable[[], object],
    timeout: float = 15.0,
    interval: float = 0.2,
    tick: Callable[[], object] | None = None,
) -> bool:
    """Call `tick` (if any), then `predicate`, every `interval` until it is true or `timeout`
    passes; returns whether it became true."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if tick is not None:
            tick()
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def wait_until(
    predicate: Callable[[], object], tick: Callable[[], object] | None = None, timeout: float = 10.0
) -> None:
    """`wait_for` at a short interval that fails the test when the condition is not reached."""
    if not wait_for(predicate, timeout=timeout, interval=0.03, tick=tick):
        raise AssertionError("condition not reached in time")
