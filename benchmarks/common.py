"""Small helpers every benchmark shares: JSON output, logging, a memory-bandwidth probe, and
the handle on a measured process (`Peer`)."""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import time
from collections.abc import Callable
from typing import Any


def write_json(path: str | None, payload: dict[str, Any]) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(payload, f, indent=2, sort_keys=True)


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s")


def copy_bandwidth_gbs(nbytes: int = 512 * 2**20, repeats: int = 5) -> float:
    """Bytes read per second by a large tensor copy (the memory-bandwidth ceiling for
    streaming weights): best of `repeats` copies of an `nbytes` buffer."""
    import torch

    src = torch.ones(nbytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
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
