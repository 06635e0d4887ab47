"""Measure one worker's prefill and decode latency through a running server.

`planner.profile.main.run` calls `measure_profile(url, plan)` once a server is up (its own,
started by the launcher, or an attached one); the integration test calls it directly. Every
request goes over gRPC through `trident.router_client.RouterClient`, to the `router` model by
default or straight to one worker model (`plan.target = "decode"`), whose inputs lack `stream`.

- Prefill: one request at a time, `max_tokens=1`; TTFT is the time from sending to the
  first response that carries a token; the median of `repeats` requests per input length.
- Decode: `concurrency` streams at once (one client, one gRPC stream and one thread each),
  `context` prompt tokens and `decode_tokens` new ones each. A stream's gaps are the times
  between consecutive responses that carry tokens, divided by the tokens the later one
  carries. The first `RAMP_GAPS` gaps of each stream are dropped, and so are the gaps outside
  the window in which every stream is decoding (after the last first token, before the first
  stream ends), unless fewer than one gap per stream is left; ITL is the median of the rest.

Prompts are random token ids (seeded), fresh for every request, so the prefix cache never
hits. `ignore_eos` keeps every request at its full length.
"""

from __future__ import annotations

import logging
import os
import platform
import queue
import statistics
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np
from tritonclient.utils import InferenceServerException

from planner.core.profile import DecodePoint, PrefillPoint, Profile
from trident.core.errors import TridentError
from trident.core.names import is_worker_model
from trident.router_client import RouterClient

logger = logging.getLogger(__name__)

RAMP_GAPS = 2  # gaps of each stream skipped: the others are still prefilling
TOKEN_IDS = (
    100,
    8000,
)  # drawn from [low, high): past the special tokens, inside any real vocabulary


@dataclass(frozen=True, slots=True)
class Plan:
    """What to measure; built by `ProfileConfig.plan()` or directly (tests)."""

    input_lengths: tuple[int, ...]
    contexts: tuple[int, ...]
    concurrency: tuple[int, ...]
    repeats: int = 3
    decode_tokens: int = 48
    seed: int = 0
    target: str = "router"  # the model requests go to: router, or a worker model (decode)
    timeout_s: float = 300.0  # longest wait for one response


@dataclass(slots=True)
class Trace:
    """One request's timeline: when it was sent, then each response that carried tokens."""

    sent: float
    times: list[float] = field(default_factory=list)  # time.perf_counter() of each response
    tokens: list[int] = field(default_factory=list)  # new tokens in each

    @property
    def ttft(self) -> float:
        return self.times[0] - self.sent

    def gaps(self) -> list[tuple[float, float, float]]:
        """(start, end, seconds per token) between consecutive responses."""
        return [
            (self.times[i - 1], self.times[i], (self.times[i] - self.times[i - 1]) / self.tokens[i])
            for i in range(1, len(self.times))
        ]


def steady_itl(traces: list[Trace], skip: int = RAMP_GAPS) -> float:
    """Median seconds per token over the streams' gaps (see the module docstring)."""
    gaps = [g for trace in traces for g in trace.gaps()[skip:]]
    start = max(trace.times[0] for trace in traces)
    end = min(trace.times[-1] for trace in traces)
    steady = [g for s, e, g in gaps if s >= start and e <= end]
    chosen = steady if len(steady) >= len(traces) else [g for _, _, g in gaps]
    if not chosen:
        raise TridentError(
            f"no inter-token gaps left after skipping {skip} per stream: raise --decode-tokens"
        )
    return statistics.median(chosen)


class Prompts:
    """Seeded random prompts, a fresh one per call. Call from one thread only."""

    def __init__(self, seed: int) -> None:
        self._rng = np.random.default_rng(seed)

    def __call__(self, length: int) -> list[int]:
        return self._rng.integers(*TOKEN_IDS, size=length, dtype=np.int64).tolist()


def request(client: RouterClient, plan: Plan, prompt: list[int], max_tokens: int) -> Trace:
    """Send one request on `client` and time its responses; `TridentError` if it fails."""
    # Our own id: a worker keys requests by it, and every client's first one is Triton's "c0".
    rid = f"profile-{uuid.uuid4().hex[:12]}"
    inputs: dict[str, Any] = {
        "input_ids": prompt,
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "request_id": rid,
    }
    if not is_worker_model(plan.target):
        inputs["stream"] = True
    trace = Trace(sent=time.perf_counter())
    try:
        for out in client.stream(model=plan.target, timeout=plan.timeout_s, **inputs):
            n = len(out.get("output_ids") or ())
            if n:
                trace.times.append(time.perf_counter())
                trace.tokens.append(n)
    except InferenceServerException as exc:
        raise TridentError(
            f"{plan.target}: request of {len(prompt)} tokens failed: {exc}"
        ) from None
    except queue.Empty:
        raise TridentError(f"{plan.target}: no response within {plan.timeout_s:.0f}s") from None
    if not trace.times:
        raise TridentError(f"{plan.target}: request of {len(prompt)} tokens returned no tokens")
    return trace


def measure_prefill(url: str, plan: Plan, prompts: Prompts) -> tuple[PrefillPoint, ...]:
    """Median TTFT per input length, one request at a time (after one warm-up request)."""
    points = []
    with RouterClient(url, plan.target) as client:
        request(client, plan, prompts(min(plan.input_lengths)), max_tokens=4)  # warm-up
        for length in plan.input_lengths:
            ttfts = [
                request(client, plan, prompts(length), max_tokens=1).ttft
                for _ in range(plan.repeats)
            ]
            point = PrefillPoint(length, statistics.median(ttfts))
            logger.info(
                "prefill input_tokens=%d ttft=%.1f ms (median of %d)",
                length,
                point.ttft_s * 1e3,
                len(ttfts),
            )
            points.append(point)
    return tuple(points)


def measure_decode_point(
    url: str, plan: Plan, prompts: Prompts, context: int, concurrency: int
) -> DecodePoint:
    """ITL with `concurrency` streams of `context` prompt tokens decoding at once."""
    batch = [prompts(context) for _ in range(concurrency)]
    clients = [RouterClient(url, plan.target) for _ in range(concurrency)]
    traces: list[Trace | None] = [None] * concurrency
    errors: list[BaseException] = []
    barrier = threading.Barrier(concurrency)

    def stream(i: int) -> None:
        try:
            barrier.wait(timeout=plan.timeout_s)
            traces[i] = request(clients[i], plan, batch[i], plan.decode_tokens)
        except Exception as exc:  # re-raised below, in the caller's thread
            errors.append(exc)
            barrier.abort()

    threads = [
        threading.Thread(target=stream, args=(i,), name=f"profile-stream-{i}")
        for i in range(concurrency)
    ]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        for client in clients:
            client.close()
    if errors:  # the first real error, not the broken barrier it left the others
        raise next(
            (e for e in errors if not isinstance(e, threading.BrokenBarrierError)), errors[0]
        )
    done = [t for t in traces if t is not None]
    point = DecodePoint(concurrency, context, steady_itl(done))
    logger.info(
        "decode concurrency=%d context=%d itl=%.1f ms", concurrency, context, point.itl_s * 1e3
    )
    return point


def measure_decode(url: str, plan: Plan, prompts: Prompts) -> tuple[DecodePoint, ...]:
    return tuple(
        measure_decode_point(url, plan, prompts, context, concurrency)
        for context in plan.contexts
        for concurrency in plan.concurrency
    )


def check_ready(url: str, target: str) -> None:
    """`TridentError` unless the server at `url` answers and `target` is ready."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    try:
        ready = client.is_model_ready(target)
    except InferenceServerException as exc:
        raise TridentError(f"no Triton server answers at {url}: {exc}") from None
    finally:
        client.close()
    if not ready:
        raise TridentError(f"model {target!r} is not ready at {url}")


def engine_of(url: str, target: str) -> str:
    """The worker's `engine` parameter (the `decode` pool's when `target` is the router)."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    try:
        config = client.get_model_config(
            target if is_worker_model(target) else "decode", as_json=True
        )
    except InferenceServerException as exc:
        logger.warning("cannot read the worker's config (%s); engine unknown", exc)
        return "unknown"
    finally:
        client.close()
    params = config.get("config", {}).get("parameters", {})
    return str(params.get("engine", {}).get("string_value") or "unknown")


def measure_profile(url: str, plan: Plan, meta: Mapping[str, Any] | None = None) -> Profile:
    """Both tables from the server at `url`, with the machine's state in `meta`."""
    check_ready(url, plan.target)
    load_before = os.getloadavg()
    started = time.monotonic()
    prompts = Prompts(plan.seed)
    prefill = measure_prefill(url, plan, prompts)
    decode = measure_decode(url, plan, prompts)
    info = {
        **(meta or {}),
        "target": plan.target,
        "engine": engine_of(url, plan.target),
        "cpu_count": os.cpu_count(),
        "loadavg_before": list(load_before),
        "loadavg_after": list(os.getloadavg()),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "duration_s": round(time.monotonic() - started, 1),
    }
    return Profile(prefill, decode, info).validate()
