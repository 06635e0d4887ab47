"""End the streams a dead router stub will never answer.

When the router model's stub process dies (killed, OOM, a crash in native code), Triton 2.51
answers none of the requests that were in flight on it, not even after the model is loaded
again (`trident.supervisor`): their gRPC streams stay open and silent until the client's
timeout. `RouterWatch` notices instead. While streams are open, every `interval_s` it sends
the router a liveness probe (the `probe` input; the router answers it on Triton's own
thread with its instance id, ahead of its request pool) and ends the tracked streams when:

- the probe fails with a Triton error ("Stub process ... is not healthy", or the model is
  unloaded or loading while the supervisor restarts it), or
- it answers with a different instance id than before: a new stub, which does not know the
  old one's requests.

A probe that merely times out ends nothing: a slow or busy server is not a dead router.

Each stream is ended by cancelling its gRPC call after marking it `lost`; `RouterClient.
generate` then raises a 503 that says so (for a stream already sent to an OpenAI client, an
SSE error event). Only streams opened before the failing probe was sent are ended: later ones
already got the dead stub's error, or reached the new stub.

Owned by `RouterClient`: created with it, `start()`ed and `close()`d on the app's event loop,
and every method runs on that loop. With `interval_s == 0` nothing is probed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from frontend.errors import APIError

logger = logging.getLogger(__name__)


@dataclass(slots=True, eq=False)
class Tracked:
    """One open router stream; `lost` says why the watch ended it (None while it runs)."""

    stream: Any  # has cancel()
    opened_at: float
    lost: str | None = field(default=None)


class RouterWatch:
    """Probes the router while streams are open; see the module docstring."""

    def __init__(
        self,
        probe: Callable[[], Awaitable[str]],
        interval_s: float = 1.0,
        timeout_s: float = 5.0,
    ) -> None:
        self.probe = probe  # the router's instance id, or raises APIError
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.ended = 0  # streams ended by the watch (tests, logs)
        self._open: set[Tracked] = set()
        self._instance: str | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.interval_s > 0 and self._task is None:
            self._task = asyncio.ensure_future(self._run())

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    def track(self, stream: Any) -> Tracked:
        entry = Tracked(stream, asyncio.get_running_loop().time())
        self._open.add(entry)
        return entry

    def untrack(self, entry: Tracked) -> None:
        self._open.discard(entry)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            if self._open:
                try:
                    await self.check()
                except Exception:  # the watch must outlive any one probe
                    logger.exception("router probe failed unexpectedly")

    async def check(self) -> int:
        """One probe; returns the number of streams ended."""
        sent_at = asyncio.get_running_loop().time()
        try:
            instance = await asyncio.wait_for(self.probe(), self.timeout_s)
        except asyncio.TimeoutError:
            logger.info("router probe timed out after %.1f s; streams left open", self.timeout_s)
            return 0
        except APIError as exc:
            self._instance = None  # whatever answers next is a new stub
            return self._end_before(sent_at, f"the router model failed ({exc.message})")
        previous, self._instance = self._instance, instance
        if previous is not None and instance != previous:
            return self._end_before(sent_at, "the router model was restarted")
        return 0

    def _end_before(self, sent_at: float, reason: str) -> int:
        lost = [entry for entry in self._open if entry.opened_at < sent_at]
        for entry in lost:
            entry.lost = reason
            self._open.discard(entry)
            entry.stream.cancel()
        if lost:
            self.ended += len(lost)
            logger.warning("%s: ending %d router stream(s) it will never answer", reason, len(lost))
        return len(lost)
