"""Prometheus metrics of the frontend, rendered in the text exposition format (0.0.4).

A dependency-free subset of what `prometheus_client` offers: counters, a gauge and
histograms with labels. One `FrontendMetrics` lives on the app (`app.state.metrics`); the
route handlers update it from the event-loop thread only, so no locks are needed.
Names follow vLLM's / Dynamo's frontend metrics with a `trident_frontend_` prefix.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence

LabelValues = tuple[str, ...]

TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
ITL_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.015,
    0.02,
    0.025,
    0.03,
    0.04,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
)
E2E_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0)


class _Metric:
    kind = ""

    def __init__(self, name: str, help_text: str, labels: Sequence[str] = ()) -> None:
        self.name = name
        self.help = help_text
        self.labels = tuple(labels)

    def _key(self, values: Sequence[str]) -> LabelValues:
        if len(values) != len(self.labels):
            raise ValueError(f"{self.name}: expected labels {self.labels}, got {tuple(values)}")
        return tuple(str(v) for v in values)

    def _fmt(self, values: LabelValues, extra: tuple[tuple[str, str], ...] = ()) -> str:
        pairs = list(zip(self.labels, values, strict=True)) + list(extra)
        if not pairs:
            return ""
        return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in pairs) + "}"

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    kind = "counter"

    def __init__(self, name: str, help_text: str, labels: Sequence[str] = ()) -> None:
        super().__init__(name, help_text, labels)
        self._values: dict[LabelValues, float] = {}

    def inc(self, *labels: str, amount: float = 1.0) -> None:
        key = self._key(labels)
        self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, *labels: str) -> float:
        return self._values.get(self._key(labels), 0.0)

    def header(self) -> list[str]:
        # text format 0.0.4: metadata names the sample, so a counter's HELP/TYPE carry `_total`
        return [f"# HELP {self.name}_total {self.help}", f"# TYPE {self.name}_total counter"]

    def render(self) -> list[str]:
        lines = self.header()
        lines += [
            f"{self.name}_total{self._fmt(k)} {_num(v)}" for k, v in sorted(self._values.items())
        ]
        return lines


class Gauge(_Metric):
    kind = "gauge"

    def __init__(self, name: str, help_text: str, labels: Sequence[str] = ()) -> None:
        super().__init__(name, help_text, labels)
        self._values: dict[LabelValues, float] = {} if labels else {(): 0.0}

    def add(self, amount: float, *labels: str) -> None:
        key = self._key(labels)
        self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, *labels: str) -> float:
        return self._values.get(self._key(labels), 0.0)

    def render(self) -> list[str]:
        return self.header() + [
            f"{self.name}{self._fmt(k)} {_num(v)}" for k, v in sorted(self._values.items())
        ]


class Histogram(_Metric):
    kind = "histogram"

    def __init__(
        self, name: str, help_text: str, buckets: Sequence[float], labels: Sequence[str] = ()
    ) -> None:
        super().__init__(name, help_text, labels)
        self.buckets = tuple(sorted(buckets))
        self._counts: dict[LabelValues, list[int]] = {}
        self._sums: dict[LabelValues, float] = {}

    def observe(self, value: float, *labels: str, count: int = 1) -> None:
        """Record `value` `count` times (an inter-token gap shared by `count` tokens)."""
        key = self._key(labels)
        counts = self._counts.setdefault(key, [0] * (len(self.buckets) + 1))
        counts[bisect.bisect_left(self.buckets, value)] += count
        self._sums[key] = self._sums.get(key, 0.0) + value * count

    def count(self, *labels: str) -> int:
        return sum(self._counts.get(self._key(labels), ()))

    def render(self) -> list[str]:
        lines = self.header()
        for key in sorted(self._counts):
            cumulative = 0
            for bound, n in zip(self.buckets + (math.inf,), self._counts[key], strict=True):
                cumulative += n
                le = "+Inf" if math.isinf(bound) else _num(bound)
                lines.append(f"{self.name}_bucket{self._fmt(key, (('le', le),))} {cumulative}")
            lines.append(f"{self.name}_sum{self._fmt(key)} {_num(self._sums[key])}")
            lines.append(f"{self.name}_count{self._fmt(key)} {cumulative}")
        return lines


class FrontendMetrics:
    """The frontend's metric set; `render()` is the body of `GET /metrics`."""

    def __init__(self, prefix: str = "trident_frontend") -> None:
        p = prefix
        self.requests = Counter(
            f"{p}_requests", "HTTP requests by endpoint and status code", ("endpoint", "status")
        )
        self.inflight = Gauge(
            f"{p}_inflight_requests", "Generation requests being served", ("endpoint",)
        )
        self.ttft = Histogram(
            f"{p}_time_to_first_token_seconds", "Time to first token", TTFT_BUCKETS, ("model",)
        )
        self.itl = Histogram(
            f"{p}_inter_token_latency_seconds",
            "Time between output tokens",
            ITL_BUCKETS,
            ("model",),
        )
        self.e2e = Histogram(
            f"{p}_request_duration_seconds",
            "End-to-end generation latency",
            E2E_BUCKETS,
            ("model",),
        )
        self.prompt_tokens = Counter(f"{p}_prompt_tokens", "Prompt tokens processed", ("model",))
        self.cached_tokens = Counter(
            f"{p}_cached_prompt_tokens", "Prompt tokens served from a prefix cache", ("model",)
        )
        self.completion_tokens = Counter(f"{p}_completion_tokens", "Tokens generated", ("model",))
        self.disconnects = Counter(
            f"{p}_client_disconnects",
            "Requests cancelled because the client went away",
            ("endpoint",),
        )
        for endpoint in ("chat_completions", "completions"):
            self.inflight.add(0, endpoint)

    def render(self) -> str:
        lines: list[str] = []
        for metric in (
            self.requests,
            self.inflight,
            self.ttft,
            self.itl,
            self.e2e,
            self.prompt_tokens,
            self.cached_tokens,
            self.completion_tokens,
            self.disconnects,
        ):
            lines += metric.render()
        return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _num(value: float) -> str:
    return str(value) if isinstance(value, int) else repr(float(value))
