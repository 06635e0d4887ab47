"""What a run records beyond vLLM's numbers, and the report over all runs.

`main.run_one` asks a `LoadClock` before and after each run whether other processes kept the
machine busy, and reads `engine_notes` from the server logs once the server is stopped. After
the last repeat `main.main` takes the `medians` per workload and system, prints them with
`print_tables`, and builds the last two lines from `ratios`. Imports `servers` (for `METRICS`)
and `workloads` (for `Workload`).
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from typing import Any

from benchmarks.serve_vs_vllm.servers import METRICS
from benchmarks.serve_vs_vllm.workloads import Workload

NOTE_MARKERS = ("core ids=", "reserved_cpus=", "Torch threads", "KV cache size")
BUSY_EXCESS = 0.5  # load-average points above what our own previous run explains


def engine_notes(*logs: str) -> list[str]:
    """vLLM's own lines on threads and KV size from the server logs (what each system ended up with)."""
    notes: list[str] = []
    for path in logs:
        with contextlib.suppress(OSError), open(path, errors="replace") as f:
            for line in f:
                if any(k in line for k in NOTE_MARKERS):
                    note = line.split("] ", 1)[-1].strip()
                    if note not in notes:
                        notes.append(note)
    return notes


class LoadClock:
    """What the 1-minute load average owes to this benchmark. The kernel's average is an
    exponential average (time constant 60 s) of runnable tasks, so with a steady background B our
    share at the end of a run is `load - B`, and it decays as exp(-t / 60 s) once our processes
    stop. B is estimated before each run as its load less our decayed share (before the first run,
    all of it); a run is busy when that estimate exceeds `BUSY_EXCESS`."""

    def __init__(self) -> None:
        self.background = 0.0
        self.end: tuple[float, float] | None = None  # (1-minute load, monotonic time) at the end of our last run

    def explained(self) -> float:
        if self.end is None:
            return 0.0
        load, at = self.end
        return max(0.0, load - self.background) * math.exp(-(time.monotonic() - at) / 60.0)

    def started(self, load_1m: float) -> tuple[float, float]:
        """(our share, the background) of the load before a run."""
        ours = self.explained()
        self.background = max(0.0, load_1m - ours)
        return ours, self.background

    def ended(self, load_1m: float) -> None:
        self.end = (load_1m, time.monotonic())


def medians(runs: list[dict[str, Any]], workload: str, system: str) -> dict[str, float] | None:
    ok = [r for r in runs if r["workload"] == workload and r["system"] == system and not r["error"]]
    if not ok:
        return None
    return {m: statistics.median(float(r[m]) for r in ok) for m in METRICS if all(r.get(m) is not None for r in ok)}


def print_tables(works: list[Workload], systems: list[str], runs: list[dict[str, Any]],
                 med: dict[str, dict[str, dict[str, float] | None]]) -> None:
    for work in works:
        print(f"\n{work.name}: {work.description}")
        print(f"{'system':<14} {'req/s':>7} {'TTFT mean':>10} {'TTFT p99':>9} {'TPOT mean':>10} {'failed':>7}  load 1m before -> after")
        for system in systems:
            m = med[work.name][system]
            own = [r for r in runs if r["workload"] == work.name and r["system"] == system]
            loads = ", ".join(f"{r['load_before'][0]:.2f}{' (busy)' if r['busy'] else ''} -> {r['load_after'][0]:.2f}"
                              for r in own)
            if m is None:
                print(f"{system:<14} {'failed: ' + own[-1]['error'].splitlines()[0][:110] if own else 'not run'}")
                continue
            print(f"{system:<14} {m['request_throughput']:7.3f} {m['mean_ttft_ms']:10.1f} {m['p99_ttft_ms']:9.1f} "
                  f"{m['mean_tpot_ms']:10.1f} {m['failed']:7.0f}  {loads}")
    for r in (r for r in runs if r["busy"]):
        print(f"busy: {r['system']} on {r['workload']} (repeat {r['repeat']}) started at 1-minute load "
              f"{r['load_before'][0]:.2f}, {r['load_explained']:.2f} of it explained by this benchmark: "
              f"~{r['load_background']:.2f} from other processes")


def ratios(med: dict[str, dict[str, dict[str, float] | None]], system: str) -> tuple[str, str, str]:
    def ratio(workload: str, metric: str, ours_on_top: bool) -> str:
        ref, ours = (med.get(workload) or {}).get("vllm-serve"), (med.get(workload) or {}).get(system)
        if not ref or not ours or not ref.get(metric) or not ours.get(metric):
            return "n/a"
        value = ours[metric] / ref[metric] if ours_on_top else ref[metric] / ours[metric]
        return f"{value:.2f}x"

    return (ratio("random", "request_throughput", True), ratio("shared-prefix", "request_throughput", True),
            ratio("random", "mean_ttft_ms", False))
