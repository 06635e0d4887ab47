"""Small helpers every benchmark shares: JSON output, logging, a memory-bandwidth probe, the
handle on a measured process (`Peer`), a spawned peer process on a pipe (`spawn_peer`) and
alternating timed repetitions (`alternate_medians`)."""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import statistics
import time
from collections.abc import Callable
from typing import Any


def write_json(path: str | None, payload: dict[str, Any], plot: bool = False, name: str = "benchmark") -> None:
    """Write `payload` to `path` (if any); with `plot`, also its PNGs beside it (benchmarks.plots)."""
    if path:
        with open(path, "w") as f:
            json.dump(payload, f, indent=2, sort_keys=True)
    if plot:
        from benchmarks.plots import write_plots

        write_plots(path, payload, name)


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s")


def read_bandwidth_gbs(nbytes: int = 512 * 2**20, repeats: int = 5) -> float:
    """Bytes read per second by a sum over a large tensor (the memory-bandwidth ceiling for
    streaming weights: reads only, unlike a copy, which also writes every byte): best of
    `repeats` passes over an `nbytes` buffer, on torch's intra-op threads."""
    import torch

    src = torch.ones(nbytes // 4, dtype=torch.float32)
    src.sum()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        src.sum()
        best = min(best, time.perf_counter() - t0)
    return nbytes / best / 1e9


class Peer:
    """The parent's handle on one process under test, built by `target(kind, opts, conn)`.

    Protocol (a `multiprocessing` pipe): the child sends `("ready", info)` once built (or
    `("error", text)`), then answers each `(command, kwargs)` with `("ok", result)` or
    `("error", text)`; `"quit"` ends it."""

    def __init__(self, kind: str, opts: dict, target: Callable[[str, dict, Any], None]) -> None:
        ctx = mp.get_context("spawn")
        self.kind = kind
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=target, args=(kind, opts, child), name=f"peer-{kind}", daemon=True)
        self.proc.start()
        status, self.info = self.conn.recv()
        if status != "ready":
            self.proc.join(10)
            raise RuntimeError(self.info)

    def ask(self, command: str, **kwargs):
        self.conn.send((command, kwargs))
        status, result = self.conn.recv()
        if status != "ok":
            raise RuntimeError(result)
        return result

    def close(self) -> None:
        try:
            self.conn.send(("quit", {}))
        except (BrokenPipeError, OSError):
            pass
        self.proc.join(60)
        if self.proc.is_alive():
            self.proc.kill()


def spawn_peer(target: Callable[..., None], *args: Any, timeout_s: float = 300.0) -> tuple[Any, Any, Any]:
    """Start `target(conn, *args)` in a spawned process; (process, this end of the pipe, the
    first message it sends once ready)."""
    ctx = mp.get_context("spawn")
    conn, child = ctx.Pipe()
    proc = ctx.Process(target=target, args=(child, *args), daemon=True)
    proc.start()
    child.close()
    if not conn.poll(timeout_s):
        raise RuntimeError(f"the peer process ({target.__name__}) did not start")
    return proc, conn, conn.recv()


def alternate_medians(
    a: Callable[[], None], b: Callable[[], None], budget_s: float,
    sync: Callable[[], None] = lambda: None, max_reps: int = 500,
) -> tuple[float, float]:
    """Median seconds of `a` and of `b`, timed alternately (A B A B ...) after one warm-up of
    each, as many repetitions as fit `budget_s` (7 at least). `sync` runs before and after
    each timing (a CUDA synchronize)."""

    def timed(fn: Callable[[], None]) -> float:
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t0

    first = timed(a) + timed(b)
    reps = max(7, min(max_reps, int(budget_s / max(first, 1e-6))))
    ta, tb = [], []
    for _ in range(reps):
        ta.append(timed(a))
        tb.append(timed(b))
    return statistics.median(ta), statistics.median(tb)
