"""A worker's measured performance, as `python -m planner.profile` writes it and the SLA
mode reads it.

Two tables, measured on the machine that serves:

- prefill: time to first token of one request alone on the worker, against its input
  length (`input_tokens` -> `ttft_s`);
- decode: inter-token latency against the number of requests decoding at once and their
  context length (`concurrency`, `context` -> `itl_s`).

Between measured points the tables are interpolated linearly, beyond them extrapolated from
the last segment; latency is made non-decreasing in load first, so a noisy point cannot make
more load look faster. JSON form: `{"version": 1, "prefill": [{"input_tokens", "ttft_s"}],
"decode": [{"concurrency", "context", "itl_s"}], "meta": {...}}`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trident.core.errors import ConfigError

VERSION = 1


@dataclass(frozen=True, slots=True)
class PrefillPoint:
    input_tokens: int
    ttft_s: float


@dataclass(frozen=True, slots=True)
class DecodePoint:
    concurrency: int
    context: int
    itl_s: float


@dataclass(frozen=True, slots=True)
class Profile:
    prefill: tuple[PrefillPoint, ...]
    decode: tuple[DecodePoint, ...]
    meta: Mapping[str, Any] = field(default_factory=dict)

    def validate(self) -> Profile:
        if len({p.input_tokens for p in self.prefill}) < 2:
            raise ConfigError("profile: prefill needs at least two input lengths")
        if not self.decode:
            raise ConfigError("profile: decode needs at least one point")
        for p in self.prefill:
            if p.input_tokens <= 0 or not p.ttft_s > 0:
                raise ConfigError(f"profile: bad prefill point {p}")
        for d in self.decode:
            if d.concurrency <= 0 or d.context <= 0 or not d.itl_s > 0:
                raise ConfigError(f"profile: bad decode point {d}")
        return self

    # ---- prefill -----------------------------------------------------------------------
    def ttft(self, input_tokens: float) -> float:
        """Seconds to prefill `input_tokens` alone on one worker."""
        xs, ys = _monotone(sorted((p.input_tokens, p.ttft_s) for p in self.prefill))
        return max(_interp(max(input_tokens, 1.0), xs, ys), 1e-6)

    def prefill_capacity(self, input_tokens: float) -> float:
        """Prompt tokens per second one worker prefills, at this input length."""
        isl = max(input_tokens, 1.0)
        return isl / self.ttft(isl)

    # ---- decode ------------------------------------------------------------------------
    def itl(self, concurrency: float, context: float) -> float:
        """Inter-token latency with `concurrency` requests of `context` tokens decoding."""
        rows = self._decode_rows()
        contexts = sorted(rows)
        per_context = [_interp(max(concurrency, 1.0), *rows[c]) for c in contexts]
        if len(contexts) == 1:
            return max(per_context[0], 1e-6)
        xs, ys = _monotone(list(zip(contexts, per_context, strict=True)))
        return max(_interp(context, xs, ys), 1e-6)

    def max_concurrency(self, itl_target_s: float, context: float) -> float:
        """Most requests one worker decodes at once with ITL within the target (>= 0)."""
        if self.itl(1.0, context) > itl_target_s:
            return 0.0
        lo, hi = 1.0, 2.0
        while self.itl(hi, context) <= itl_target_s and hi < 1e5:
            lo, hi = hi, hi * 2
        for _ in range(40):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if self.itl(mid, context) <= itl_target_s else (lo, mid)
        return lo

    def decode_capacity(self, itl_target_s: float, context: float) -> float:
        """Output tokens per second one worker generates while meeting the ITL target."""
        c = self.max_concurrency(itl_target_s, context)
        return c / self.itl(c, context) if c > 0 else 0.0

    def _decode_rows(self) -> dict[int, tuple[list[float], list[float]]]:
        by_context: dict[int, list[tuple[float, float]]] = {}
        for d in self.decode:
            by_context.setdefault(d.context, []).append((float(d.concurrency), d.itl_s))
        return {c: _monotone(sorted(points)) for c, points in by_context.items()}

    # ---- files -------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "version": VERSION,
            "prefill": [{"input_tokens": p.input_tokens, "ttft_s": p.ttft_s} for p in self.prefill],
            "decode": [{"concurrency": d.concurrency, "context": d.context, "itl_s": d.itl_s} for d in self.decode],
            "meta": dict(self.meta),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Profile:
        if not isinstance(data, Mapping):
            raise ConfigError(f"profile: expected a JSON object, got {type(data).__name__}")
        if not isinstance(data.get("meta") or {}, Mapping):
            raise ConfigError("profile: meta must be an object")
        if data.get("version") != VERSION:
            raise ConfigError(f"profile: version {data.get('version')!r} is not {VERSION}")
        try:
            prefill = tuple(PrefillPoint(int(p["input_tokens"]), float(p["ttft_s"])) for p in data["prefill"])
            decode = tuple(
                DecodePoint(int(d["concurrency"]), int(d["context"]), float(d["itl_s"])) for d in data["decode"]
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"profile: malformed point ({exc})") from None
        return cls(prefill, decode, dict(data.get("meta") or {})).validate()

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Profile:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"profile: cannot read {str(path)!r}: {exc}") from None
        return cls.from_json(data)


def _monotone(points: Sequence[tuple[float, float]]) -> tuple[list[float], list[float]]:
    """xs ascending (duplicates averaged), ys made non-decreasing."""
    merged: dict[float, list[float]] = {}
    for x, y in points:
        merged.setdefault(float(x), []).append(float(y))
    xs = sorted(merged)
    ys: list[float] = []
    for x in xs:
        y = sum(merged[x]) / len(merged[x])
        ys.append(max(y, ys[-1]) if ys else y)
    return xs, ys


def _interp(x: float, xs: Sequence[float], ys: Sequence[float]) -> float:
    """Piecewise-linear through (xs, ys); linear extrapolation beyond both ends."""
    if len(xs) == 1:
        return ys[0] * (x / xs[0]) if x > xs[0] else ys[0]
    if x <= xs[0]:
        i = 0
    elif x >= xs[-1]:
        i = len(xs) - 2
    else:
        i = next(k for k in range(len(xs) - 1) if xs[k] <= x <= xs[k + 1])
    x0, x1, y0, y1 = xs[i], xs[i + 1], ys[i], ys[i + 1]
    y = y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    if x < xs[0]:
        y = max(y, ys[0] * 0.5)  # below the smallest measured load, do not promise miracles
    return y if math.isfinite(y) else ys[-1]
