"""Moving KV blocks between a host arena and block files: plain file I/O vs NIXL's POSIX backend.

The disk tier (`kv_manager.tiers.disk`) keeps one file per KV block. This benchmark times the
two ways of moving N such blocks, each SmolLM2-135M's torch-engine block (30 layers, 3 KV
heads, head dim 64, 16 tokens, bf16: 360 KiB), between one host arena tensor and N files:

- plain: per block `os.open(O_CREAT|O_EXCL, 0600)`, `os.write` from a memoryview of the arena
  slot, close; reading back, `os.open`, `os.readv` straight into the slot's memoryview, close
  (no intermediate bytes objects).
- NIXL POSIX: the same files, opened the same way, registered as `FILE_SEG` (offset 0, length,
  fd) with the POSIX backend, and moved by one local (loopback) transfer request for all N
  blocks from/into the registered arena (`DRAM_SEG`), as NIXL intends; files deregistered and
  closed after. The arena is registered once, outside the timing (a tier would do that once).

Both sides write without fsync (as the disk tier does). Reads are timed twice: "warm", right
after the write, served from the page cache; and "cold", after each file is fsynced and
evicted with `posix_fadvise(DONTNEED)` (outside the timing; only this benchmark's files are
evicted, nothing else on the machine). Reads go into a second arena, zeroed first and checked
bit-for-bit against the source afterwards. The sides alternate, first side swapped every round,
after one untimed warm-up each; medians are reported. XXH3-128 over the N slots (the
disk tier's checksum) is timed alongside: either way the tier hashes the arena slot.

    taskset -c 0 python -m benchmarks.kv_disk_io [--blocks N] [--rounds R] [--json PATH]

Last line: `kv disk io: NIXL POSIX write {w}x, read {r}x plain file I/O`: the median over rounds
of plain time / NIXL time in the same round (above 1: NIXL is faster); read is the page-cache
read. The JSON also has the ratio of the two medians. Without an importable NIXL only the
plain side runs and the last line says so.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xxhash

from benchmarks.common import setup_logging, write_json
from benchmarks.kv_transfer import LAYOUT
from benchmarks.plots import add_plot_flag

PHASES = ("write", "read_warm", "read_cold")
QUEUES = ("default", "aio", "uring", "posix_aio")
NBYTES = LAYOUT.block_nbytes


def slot_views(arena: torch.Tensor) -> list[memoryview]:
    """One writable memoryview per block of a contiguous arena, sharing its memory."""
    flat = memoryview(arena.view(-1).view(torch.uint8).numpy())
    return [flat[i * NBYTES : (i + 1) * NBYTES] for i in range(arena.shape[0])]


def create(path: Path) -> int:
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)


class PlainIO:
    name = "plain"

    def write(self, paths: list[Path], src: list[memoryview]) -> None:
        for path, view in zip(paths, src, strict=True):
            fd = create(path)
            try:
                while view:
                    view = view[os.write(fd, view) :]
            finally:
                os.close(fd)

    def read(self, paths: list[Path], dst: list[memoryview]) -> None:
        for path, view in zip(paths, dst, strict=True):
            fd = os.open(path, os.O_RDONLY)
            try:
                got = 0
                while got < NBYTES:
                    n = os.readv(fd, [view[got:]])
                    if n == 0:
                        raise RuntimeError(f"{path}: truncated at {got} of {NBYTES} bytes")
                    got += n
            finally:
                os.close(fd)

    def close(self) -> None:
        pass


class NixlPosixIO:
    """One NIXL agent with only the POSIX backend; transfers are loopback (local agent)."""

    name = "nixl"

    def __init__(self, api: Any, arenas: list[torch.Tensor], queue: str) -> None:
        self.agent = api.nixl_agent(
            "kv-disk-io", api.nixl_agent_config(enable_prog_thread=False, backends=[])
        )
        # NIXL's default queue is Linux AIO (libaio); on buffered files io_submit does the copy
        self.agent.create_backend("POSIX", {} if queue == "default" else {f"use_{queue}": "true"})
        self.arena_regs = [self.agent.register_memory(a, backends=["POSIX"]) for a in arenas]

    def write(self, paths: list[Path], src: torch.Tensor) -> None:
        self._move("WRITE", paths, create, src)

    def read(self, paths: list[Path], dst: torch.Tensor) -> None:
        self._move("READ", paths, lambda p: os.open(p, os.O_RDONLY), dst)

    def _move(
        self, op: str, paths: list[Path], opener: Callable[[Path], int], arena: torch.Tensor
    ) -> None:
        fds: list[int] = []
        try:
            for path in paths:
                fds.append(opener(path))
            files = self.agent.register_memory(
                [(0, NBYTES, fd, "") for fd in fds], "FILE", backends=["POSIX"]
            )
            try:
                base = arena.data_ptr()
                rows = np.array(
                    [(base + i * NBYTES, NBYTES, 0) for i in range(len(fds))], np.uint64
                )
                handle = self.agent.initialize_xfer(
                    op,
                    self.agent.get_xfer_descs(rows, "DRAM"),
                    files.trim(),
                    self.agent.name,
                    backends=["POSIX"],
                )
                state = self.agent.transfer(handle)
                while state == "PROC":
                    state = self.agent.check_xfer_state(handle)
                handle.release()
                if state != "DONE":
                    raise RuntimeError(f"NIXL POSIX {op} of {len(fds)} blocks ended in {state}")
            finally:
                self.agent.deregister_memory(files, backends=["POSIX"])
        finally:
            for fd in fds:
                os.close(fd)

    def close(self) -> None:
        for reg in self.arena_regs:
            self.agent.deregister_memory(reg, backends=["POSIX"])


def nixl_api() -> Any | None:
    """NIXL's Python API (`nixl_cu12` wheel, aliased to `nixl`), or None if it does not import."""
    os.environ.setdefault("NIXL_LOG_LEVEL", "WARN")  # NIXL logs INFO lines to stdout otherwise
    try:
        from benchmarks.kv_connectors.workers import alias_nixl

        alias_nixl()
        import nixl._api as api
    except ImportError:
        return None
    return api


def evict(paths: list[Path]) -> None:
    """Make the next read come from the disk: flush each file, then drop its cached pages."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run(blocks: int, rounds: int, root: Path, nixl_queue: str | None) -> dict[str, Any]:
    src = torch.empty(LAYOUT.pool_shape(blocks), dtype=torch.bfloat16)
    src.view(torch.int16).copy_(torch.randint(-(2**15), 2**15, src.shape, dtype=torch.int16))
    dst = torch.zeros_like(src)
    views = {"src": slot_views(src), "dst": slot_views(dst)}
    api = nixl_api() if nixl_queue else None
    sides: list[PlainIO | NixlPosixIO] = [PlainIO()]
    if api is not None:
        sides.append(NixlPosixIO(api, [src, dst], nixl_queue))
    # the plain side moves memoryviews of the slots, NIXL the registered arena itself
    args = {"plain": (views["src"], views["dst"]), "nixl": (src, dst)}
    times: dict[str, dict[str, list[float]]] = {s.name: {p: [] for p in PHASES} for s in sides}
    checksum: list[float] = []

    def fresh(side: str) -> list[Path]:
        d = root / side
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(mode=0o700)
        return [d / f"{i:016x}.kvb" for i in range(blocks)]

    def read_checked(side: PlainIO | NixlPosixIO, paths: list[Path]) -> float:
        dst.zero_()
        seconds = timed(lambda: side.read(paths, args[side.name][1]))
        if not torch.equal(dst.view(torch.int16), src.view(torch.int16)):
            raise RuntimeError(f"{side.name}: blocks read back differ from those written")
        return seconds

    try:
        for side in sides:  # warm-up, untimed
            side.write(fresh(side.name), args[side.name][0])
        for r in range(rounds):
            order = sides if r % 2 == 0 else sides[::-1]
            paths = {}
            for side in order:
                paths[side.name] = p = fresh(side.name)
                times[side.name]["write"].append(
                    timed(lambda s=side, p=p: s.write(p, args[s.name][0]))
                )
            for side in order:
                times[side.name]["read_warm"].append(read_checked(side, paths[side.name]))
            for side in order:
                evict(paths[side.name])
                times[side.name]["read_cold"].append(read_checked(side, paths[side.name]))
            checksum.append(
                timed(lambda: [xxhash.xxh3_128_digest(v) for v in views["src"]])
            )
    finally:
        for side in sides:
            side.close()
    return {"times_s": times, "checksum_s": checksum}


def summarize(blocks: int, result: dict[str, Any]) -> dict[str, Any]:
    nbytes = blocks * NBYTES

    def stat(samples: list[float]) -> dict[str, Any]:
        med = statistics.median(samples)
        return {"median_s": med, "gbps": nbytes / med / 1e9, "samples_s": samples}

    sides = {
        name: {p: stat(s) for p, s in phases.items()} for name, phases in result["times_s"].items()
    }
    paired = of_medians = None
    if "nixl" in sides:
        # each round times both sides back to back: the per-round ratio cancels the drift of a
        # shared machine (other jobs, writeback) that moves both sides' times together
        t = result["times_s"]
        paired = {
            p: statistics.median(a / b for a, b in zip(t["plain"][p], t["nixl"][p], strict=True))
            for p in PHASES
        }
        of_medians = {
            p: sides["plain"][p]["median_s"] / sides["nixl"][p]["median_s"] for p in PHASES
        }
    return {
        "sides": sides,
        "checksum": stat(result["checksum_s"]),
        "plain_over_nixl": paired,
        "plain_median_over_nixl_median": of_medians,
    }


def report(res: dict[str, Any]) -> list[str]:
    """The printed table; the last line is the headline."""
    before, after = (
        " ".join(f"{x:.2f}" for x in res[k]) for k in ("loadavg_before", "loadavg_after")
    )
    lines = [
        f"KV disk I/O: {res['blocks']} blocks x {NBYTES / 1024:.0f} KiB ({res['layout']}), "
        f"{res['rounds']} rounds, CPUs {res['cpu_affinity']}, no fsync on write, load average {before} -> {after}",
        f"{'side':<6} {'write ms':>9} {'GB/s':>6} {'warm read ms':>13} {'GB/s':>6} "
        f"{'cold read ms':>13} {'GB/s':>6}",
    ]
    for name, s in res["sides"].items():
        cells = " ".join(
            f"{s[p]['median_s'] * 1e3:>{w}.1f} {s[p]['gbps']:>6.2f}"
            for p, w in zip(PHASES, (9, 13, 13), strict=True)
        )
        lines.append(f"{name:<6} {cells}")
    c = res["checksum"]
    lines.append(
        f"XXH3-128 of the {res['blocks']} slots: {c['median_s'] * 1e3:.1f} ms ({c['gbps']:.2f} GB/s)"
    )
    ratio = res["plain_over_nixl"]
    if ratio:
        lines.append(
            f"NIXL POSIX queue {res['nixl_io_queue']}: cold read {ratio['read_cold']:.2f}x plain file I/O"
        )
        lines.append(
            f"kv disk io: NIXL POSIX write {ratio['write']:.2f}x, read {ratio['read_warm']:.2f}x "
            "plain file I/O"
        )
    else:
        plain = res["sides"]["plain"]
        lines.append(
            f"kv disk io: plain file I/O only ({res['nixl_note']}): write "
            f"{plain['write']['gbps']:.2f} GB/s, read {plain['read_warm']['gbps']:.2f} GB/s"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--blocks", type=int, default=256, help="blocks per request (default 256)")
    ap.add_argument("--rounds", type=int, default=7, help="timed rounds per side (default 7)")
    ap.add_argument("--dir", help="where to put the block files (default: a fresh temp dir)")
    ap.add_argument("--no-nixl", action="store_true", help="run the plain side only")
    ap.add_argument(
        "--nixl-queue",
        choices=QUEUES,
        default="default",
        help="the POSIX backend's I/O queue (default: NIXL's own choice, Linux AIO)",
    )
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    add_plot_flag(ap)
    args = ap.parse_args(argv)
    if args.blocks < 1 or args.rounds < 1:
        ap.error("--blocks and --rounds must be at least 1")
    setup_logging()
    torch.set_num_threads(1)
    load_before = os.getloadavg()
    root = Path(tempfile.mkdtemp(prefix="kv-disk-io-", dir=args.dir))
    try:
        result = run(args.blocks, args.rounds, root, None if args.no_nixl else args.nixl_queue)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    summary = summarize(args.blocks, result)
    nixl_ran = summary["plain_over_nixl"] is not None
    res = {
        "layout": LAYOUT.describe(),
        "block_nbytes": NBYTES,
        "blocks": args.blocks,
        "rounds": args.rounds,
        "files_under": str(root.parent),
        "fsync_on_write": False,
        "cpu_affinity": sorted(os.sched_getaffinity(0)),
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "nixl": nixl_ran,
        "nixl_io_queue": args.nixl_queue if nixl_ran else None,
        "nixl_note": "ran"
        if nixl_ran
        else ("--no-nixl" if args.no_nixl else "NIXL not importable"),
        "warm_read": "page cache, right after the write",
        "cold_read": "after fsync + posix_fadvise(DONTNEED) of each file, untimed",
        **summary,
    }
    lines = report(res)
    res["last_line"] = lines[-1]
    write_json(args.json, res, plot=args.plot, name="kv_disk_io")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
