"""Sequence tracking and resync for one worker's KV event stream (pure logic, no sockets).

The subscriber thread feeds a `StreamSync` what arrives from one worker and carries out the
`Actions` it returns (clear the worker in the index, apply event batches in order, send a
resync request). Rules:

- Batches carry 0, 1, 2, ... A batch above the expected number is a gap; a batch below it,
  or a new publisher `instance` in a load report / announce, is a restart (clear, resync).
- Load reports and announces carry the worker's next sequence number, so a gap at the tail
  of the stream (the last batches lost, nothing after them) is seen too.
- First contact: a stream that starts at 0 needs nothing; otherwise the router missed the
  worker's earlier events and resyncs.
- While a resync is in flight, live batches are held. A snapshot (Trident publishers) rebuilds
  the worker from empty and the held batches at or after its sequence number follow; a replay
  (vLLM publishers) returns the missed batches, merged with the held ones in order.
- A resync that gets no answer in time, or a worker with no resync endpoint, releases the held
  batches anyway (a slightly stale index beats a frozen one) and is logged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from kv_manager.events import KVEvent

logger = logging.getLogger(__name__)

Batch = tuple[int, tuple[KVEvent, ...]]


@dataclass(slots=True)
class Actions:
    """What the subscriber must do, in this order: clear, apply each batch, send a resync."""

    clear: bool = False
    apply: list[tuple[KVEvent, ...]] = field(default_factory=list)
    resync: bool = False


class StreamSync:
    """One worker's stream state. Used only by the subscriber thread (not thread-safe)."""

    def __init__(self, worker_id: str) -> None:
        self.worker_id = worker_id
        self.next_seq: int | None = None  # the batch number expected next; None: never synced
        self.instance: str | None = None
        self.resyncing = False
        self.resync_started = 0.0
        self.gaps = 0
        self.restarts = 0
        self.resyncs = 0
        self._held: list[Batch] = []
        self._replayed: list[Batch] = []
        self._last_hint = 0

    def reset(self) -> None:
        """Forget the stream (the worker left or went silent); counters are kept."""
        self.next_seq = None
        self.instance = None
        self.resyncing = False
        self._held = []
        self._replayed = []
        self._last_hint = 0

    # ------------------------------------------------------------ live stream

    def on_batch(self, seq: int, events: tuple[KVEvent, ...]) -> Actions:
        actions = Actions()
        if self.resyncing:
            self._held.append((seq, events))
            return actions
        expected = self.next_seq
        if expected is not None and seq < expected:
            self._restart(actions, f"sequence went back from {expected} to {seq}")
            expected = None
        if expected is None and seq == 0 or seq == expected:
            actions.apply.append(events)
            self.next_seq = seq + 1
            return actions
        if expected is not None:
            self.gaps += 1
            logger.warning(
                "kv sync worker=%s: gap, expected seq %d got %d", self.worker_id, expected, seq
            )
        self._held.append((seq, events))
        actions.resync = True
        return actions

    def on_hint(self, next_seq: int, instance: str | None = None) -> Actions:
        """A load report or announce: the worker's next sequence number (and publisher id)."""
        actions = Actions()
        if instance is not None and instance != self.instance:
            if self.instance is not None:
                self._restart(actions, f"new publisher instance {instance}")
            self.instance = instance
        self._last_hint = next_seq
        if self.resyncing:
            return actions
        if self.next_seq is None:
            if next_seq == 0:
                self.next_seq = 0
            else:
                actions.resync = True
        elif next_seq > self.next_seq:
            self.gaps += 1
            logger.warning(
                "kv sync worker=%s: missed batches %d..%d",
                self.worker_id,
                self.next_seq,
                next_seq - 1,
            )
            actions.resync = True
        elif next_seq < self.next_seq:
            self._restart(actions, f"next seq went back from {self.next_seq} to {next_seq}")
            actions.resync = next_seq > 0
            if not actions.resync:
                self.next_seq = 0
        return actions

    # ------------------------------------------------------------ resync

    def begin_resync(self, now: float) -> int:
        """The subscriber sent a resync request; returns the first missing sequence number."""
        self.resyncing = True
        self.resync_started = now
        self.resyncs += 1
        self._replayed = []
        return self.next_seq or 0

    def on_snapshot(self, next_seq: int, events: tuple[KVEvent, ...]) -> Actions:
        """Snapshot reply: `events` rebuild the worker from empty up to batch `next_seq - 1`."""
        actions = Actions(clear=True, apply=[events])
        self.resyncing = False
        self.next_seq = next_seq
        self._release(actions, from_seq=next_seq)
        return actions

    def on_replay_batch(self, seq: int, events: tuple[KVEvent, ...]) -> None:
        self._replayed.append((seq, events))

    def on_replay_end(self) -> Actions:
        actions = Actions()
        start = self.next_seq or 0
        self.resyncing = False
        self._held = self._replayed + self._held
        self._replayed = []
        self._release(actions, from_seq=start)
        return actions

    def give_up(self, reason: str) -> Actions:
        """No resync possible or none answered: apply what is held and go on."""
        actions = Actions()
        logger.warning(
            "kv sync worker=%s: resync abandoned (%s); index may be stale", self.worker_id, reason
        )
        self.resyncing = False
        self._replayed = []
        held = sorted(self._held, key=lambda b: b[0])
        self._release(actions, from_seq=held[0][0] if held else (self.next_seq or 0))
        self.next_seq = max(self.next_seq or 0, self._last_hint)
        return actions

    # ------------------------------------------------------------ internals

    def _restart(self, actions: Actions, why: str) -> None:
        logger.warning(
            "kv sync worker=%s: restarted (%s); clearing its entries", self.worker_id, why
        )
        self.restarts += 1
        actions.clear = True
        actions.apply.clear()
        self.next_seq = None
        self.resyncing = False
        self._held = []
        self._replayed = []

    def _release(self, actions: Actions, from_seq: int) -> None:
        """Apply held batches from `from_seq` on, in order; a hole left means another gap."""
        expected = from_seq
        for seq, events in sorted(self._held, key=lambda b: b[0]):
            if seq < expected:
                continue  # already covered (snapshot, or replayed twice)
            if seq > expected:
                self.gaps += 1
                logger.warning(
                    "kv sync worker=%s: batches %d..%d are lost", self.worker_id, expected, seq - 1
                )
            actions.apply.append(events)
            expected = seq + 1
        self._held = []
        self.next_seq = expected
