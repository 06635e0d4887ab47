"""Stop strings over streamed text.

Owned by one request's streaming loop. `feed` returns the text that is safe to emit: text
that could be the beginning of a stop string is held back until the next delta shows
whether the stop string completes (then everything from it on is dropped) or not (then the
held text is released).
"""

from __future__ import annotations

from collections.abc import Iterable


class StopStringMatcher:
    """Detects the earliest stop string across delta boundaries."""

    __slots__ = ("stops", "_held")

    def __init__(self, stops: Iterable[str]) -> None:
        self.stops = tuple(s for s in stops if s)
        self._held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(text to emit, whether a stop string was hit). After a hit, stop feeding."""
        if not self.stops:
            return text, False
        buf = self._held + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self._held = ""
            return buf[: min(hits)], True
        keep = self._partial_suffix(buf)
        self._held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        """Held text, released at the end of the stream (no stop string followed)."""
        held, self._held = self._held, ""
        return held

    def _partial_suffix(self, buf: str) -> int:
        """Length of the longest suffix of `buf` that is a proper prefix of a stop string."""
        best = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(buf)), best, -1):
                if buf.endswith(stop[:k]):
                    best = k
                    break
        return best
