"""Soak: mixed load against `trident serve` (2 decode + 1 prefill workers) for `--minutes`.

Starts the server in-process through Trident's launcher (float32, one torch thread per
worker, a small KV pool, free ports, prompts of `--threshold` uncached tokens prefilled by
the prefill worker) and the OpenAI frontend as its own process, as `trident serve` does;
warms every worker up; then `--concurrency` client threads (`benchmarks.soak_load`) send
chat and completions, streaming and not, cancellations, disconnects and bad inputs.

The kill: at a third of the run, one decode worker's Python stub gets SIGKILL. Triton 2.51
does not restart it; a launcher with a stub supervisor does (`trident.supervisor`). The soak
waits `--restart-wait-s` for a new stub that is ready, and otherwise unloads and loads the
worker itself through Triton's model-control API, with the launcher's key, as the launcher
first loaded it (`soak_probe.reload_worker`); the JSON says which (`kill.restarted_by`). A
request in flight at the kill that fails with "worker ... went away" (the router's) or
"... is not healthy" (Triton's, for a dead stub) counts as `lost_to_kill`; the same error on
a request sent after the kill, and every other failure, is an unexpected error. The last
line counts both (the router migrates requests off a killed worker: none should be lost).

Readings (`benchmarks.soak_probe`), at start (after warm-up) and at the end (after the load
stops and `--idle-s` of idling): the resident memory of every server process and of the
frontend; at the end, what is left behind: KV blocks of running requests and blocks leased
to pulls (each worker's `trident_kv_blocks_used` / `trident_kv_blocks_held`; a leased block
is in both, so a worker counts the larger), active leases (`trident_kv_leases_active`,
counted 0 if the server does not publish it), requests the workers still hold
(`trident_requests_inflight`), and this server's /dev/shm entries against the start (the
killed stub's own region is reported apart: Triton leaves it until the server stops). The
leak figures are read once the killed worker's unreleased leases have run out their TTL (30
s): in runs of more than about a minute, right after the idle; while something is left the
end is read again each second for another lease TTL, to tell leaks that heal from leaks
that stay (`leaks.final` in the JSON).

    python -m benchmarks.soak --minutes N [--json PATH] [--seed S] [--concurrency C] [--no-kill]

Last line: `soak: {n} requests, {e} unexpected errors, RSS growth {g}%, leaked {b} blocks
{l} leases {s} shm`. RSS growth is over the processes alive at both readings (the reloaded
worker is listed apart). Goal over 30 minutes: 0 unexpected errors, nothing leaked, RSS
growth below 10%.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import random
import signal
import threading
import time
from typing import Any

import httpx
import openai

from benchmarks.common import setup_logging, write_json
from benchmarks.plots import add_plot_flag
from benchmarks.soak_load import Load, Prompts
from benchmarks.soak_probe import (
    kv_gauges,
    processes,
    reload_worker,
    rss_growth,
    server_pid,
    shm_entries,
    stub_pid,
    stub_region,
    wait_for_restart,
)
from trident.cli_support import FrontendProcess, start_frontend
from trident.core.errors import TridentError
from trident.launcher import SHM_DIR, Launcher, group_pids
from trident.serve_config import LOG_LEVELS, ServeConfig

logger = logging.getLogger("benchmarks.soak")

# A lease is freed at the latest this long after its export (TorchEngineConfig.lease_ttl_s +
# kv_manager.transfer.lease.EXPIRY_GRACE_S + a poll's margin); those meant for the killed
# worker are exported until the router drops it, 3 s (worker_timeout_s) after the kill.
LEASE_EXPIRY_S = 30.0 + 2.0 + 3.0
KILL_LEASES_DONE_S = 3.0 + LEASE_EXPIRY_S
LEAK_KEYS = ("blocks", "blocks_used", "blocks_held", "leases", "inflight", "shm")


def warm_up(base_url: str, model: str, prompts: Prompts) -> None:
    """Requests until one succeeds (the router admits workers as their first load reports
    arrive), then long and shared-prefix prompts so that every worker has run the largest
    shapes once before the first memory reading."""
    client = openai.OpenAI(base_url=base_url + "/v1", api_key="soak", max_retries=0, timeout=120)
    rng = random.Random(1)
    deadline = time.monotonic() + 120
    while True:
        try:
            client.completions.create(model=model, prompt="Hello", max_tokens=2)
            break
        except openai.APIError as exc:
            if time.monotonic() > deadline:
                raise TridentError(f"warm-up: the server never answered: {exc}") from exc
            time.sleep(0.5)
    for i in range(6):
        words = 2 * prompts.long_words if i % 2 else prompts.long_words
        text = (
            prompts.prefixes[i % len(prompts.prefixes)] + " " if i >= 3 else ""
        ) + Prompts.words(rng, words)
        client.completions.create(model=model, prompt=text, max_tokens=8)
        client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": text[:200]}], max_tokens=8
        )
    client.close()


def kill_and_restart(
    args: argparse.Namespace, launcher: Launcher, load: Load, at: float, pids: set[int]
) -> dict[str, Any]:
    """At `at` (time.monotonic()), SIGKILL a decode worker's stub; wait for the server to
    restart it, else (after `--restart-wait-s`) unload and load it here."""
    time.sleep(max(0.0, at - time.monotonic()))
    worker = random.Random(args.seed).choice(launcher.decode_models)
    pid = stub_pid(launcher, worker)
    region = stub_region(pid)
    pids.add(pid)
    killed_at = time.monotonic()
    inflight = load.at_kill(lambda: os.kill(pid, signal.SIGKILL))
    logger.info("killed %s (pid %d) with %d requests in flight", worker, pid, inflight)
    new_pid = wait_for_restart(launcher, worker, pid, args.restart_wait_s)
    by, error = "server", ""
    if new_pid is None:
        by = "soak"
        try:
            reload_worker(launcher, worker)
            new_pid = stub_pid(launcher, worker)
        except (TridentError, RuntimeError) as exc:  # reported as an unexpected error
            error = str(exc)[:500]
            logger.error("reloading %s failed: %s", worker, error)
    if new_pid is not None:
        pids.add(new_pid)
    back_s = time.monotonic() - killed_at
    logger.info(
        "%s is back (pid %s, restarted by the %s) %.1fs after the kill", worker, new_pid, by, back_s
    )
    return {
        "worker": worker,
        "pid": pid,
        "new_pid": new_pid,
        "inflight_at_kill": inflight,
        "killed_at": killed_at,
        "region": region,
        "restarted_by": by,
        "back_after_s": back_s,
        "reload_error": error,
    }


def leak_reading(
    launcher: Launcher, shm_start: dict[str, int], pids: set[int], skip: str
) -> dict[str, Any]:
    """One reading of what is left: gauge totals and new /dev/shm entries (`skip`: the killed
    stub's own region, which Triton leaves behind; reported apart)."""
    assert launcher.endpoints is not None
    gauges = kv_gauges(launcher.endpoints.metrics_url)
    shm = shm_entries(launcher, pids, skip)
    used = gauges["trident_kv_blocks_used"]["workers"]
    held = gauges["trident_kv_blocks_held"]["workers"]
    return {
        "t": time.monotonic(),
        # a leased block is in both gauges of its (prefill) worker; a block in two leases
        # (a shared prefix) twice in `held`
        "blocks": sum(max(used.get(w, 0.0), held.get(w, 0.0)) for w in used.keys() | held.keys()),
        "blocks_used": gauges["trident_kv_blocks_used"]["total"],
        "blocks_held": gauges["trident_kv_blocks_held"]["total"],
        "leases": gauges["trident_kv_leases_active"]["total"],
        "inflight": gauges["trident_requests_inflight"]["total"],
        "shm": sum(max(0, shm[k] - shm_start[k]) for k in ("regions", "kv_pools")),
        "gauges": gauges,
        "shm_entries": shm,
    }


def read_leaks(
    launcher: Launcher, shm_start: dict[str, int], pids: set[int], kill: dict[str, Any] | None
) -> dict[str, Any]:
    """What is left once the server idles.

    Read at once (`at_idle`); while something is left, again every second until nothing is
    or every lease exported during the load has run out its TTL (`final`: left for good).
    The headline is the first reading from when the killed worker's unreleased leases have
    expired too: `at_idle` in any run of more than a minute or so."""
    skip = kill["region"] if kill else ""
    readings = [leak_reading(launcher, shm_start, pids, skip)]
    give_up = readings[0]["t"] + LEASE_EXPIRY_S
    while any(readings[-1][k] for k in LEAK_KEYS) and time.monotonic() < give_up:
        time.sleep(1.0)
        readings.append(leak_reading(launcher, shm_start, pids, skip))
    kill_done = kill["killed_at"] + KILL_LEASES_DONE_S if kill else 0.0
    headline = next((r for r in readings if r["t"] >= kill_done), readings[-1])
    t0 = readings[0]["t"]

    def brief(r: dict[str, Any]) -> dict[str, Any]:
        return {"after_s": r["t"] - t0, **{k: r[k] for k in LEAK_KEYS}}

    return {
        **{k: headline[k] for k in LEAK_KEYS},
        "read_after_s": headline["t"] - t0,
        "at_idle": brief(readings[0]),
        "final": brief(readings[-1]),
        "gauges": headline["gauges"],
        "gauges_absent": headline["gauges"]["absent"],
        "shm_start": shm_start,
        "shm_end": headline["shm_entries"],
        "killed_region_left": bool(skip) and (SHM_DIR / skip).exists(),
    }


def soak(
    args: argparse.Namespace,
    launcher: Launcher,
    frontend: FrontendProcess,
    model: str,
    prompts: Prompts,
) -> dict[str, Any]:
    """The measured part: start readings, the load (and the kill), end readings."""
    front_pid = frontend.proc.pid
    pids = group_pids(server_pid(launcher))  # the pids whose KV pools are this server's
    rss_start = processes(launcher, front_pid)
    shm_start = shm_entries(launcher, pids)
    t0 = time.time()
    duration = args.minutes * 60.0
    load = Load(frontend.base_url, model, prompts, concurrency=args.concurrency, seed=args.seed)
    runner = threading.Thread(
        target=load.run, args=(time.monotonic() + duration,), name="soak-load", daemon=True
    )
    start = time.monotonic()
    runner.start()
    kill = (
        None if args.no_kill else kill_and_restart(args, launcher, load, start + duration / 3, pids)
    )
    runner.join()
    load_s = time.monotonic() - start
    time.sleep(args.idle_s)
    pids |= group_pids(server_pid(launcher))
    rss_end = processes(launcher, front_pid)
    leaks = read_leaks(launcher, shm_start, pids, kill)
    tally = load.tally()
    unexpected = dict(tally.unexpected)
    samples = dict(tally.samples)
    if kill and kill["reload_error"]:
        unexpected["reload_failed"] = 1
        samples["reload_failed"] = kill["reload_error"]
    if kill:
        kill["killed_at_s"] = kill.pop("killed_at") - start
    return {
        "started": t0,
        "ended": time.time(),
        "load_s": load_s,
        "requests": dict(tally.requests),
        "completed": dict(tally.completed),
        "expected_errors": dict(tally.expected),
        "unexpected_errors": unexpected,
        "error_samples": samples,
        "lost_to_kill": tally.lost_to_kill,
        "lost_sample": tally.lost_sample,
        "kill": kill,
        "rss": {
            "start": [dataclasses.asdict(p) for p in rss_start],
            "end": [dataclasses.asdict(p) for p in rss_end],
            **rss_growth(rss_start, rss_end),
        },
        "leaks": leaks,
    }


def report(r: dict[str, Any]) -> None:
    """The result lines (stdout)."""
    for kind, n in sorted(r["requests"].items()):
        print(f"  {kind:18} {n:6} sent {r['completed'].get(kind, 0):6} ended as intended")
    print(
        "  expected 4xx: "
        + (", ".join(f"{k} {v}" for k, v in sorted(r["expected_errors"].items())) or "none")
    )
    for kind, n in sorted(r["unexpected_errors"].items()):
        print(f"  UNEXPECTED {kind}: {n} (e.g. {r['error_samples'].get(kind, '')[:200]})")
    if r["kill"]:
        k = r["kill"]
        print(
            f"  killed {k['worker']} at {k['killed_at_s']:.0f}s with {k['inflight_at_kill']} requests in flight, "
            f"back {k['back_after_s']:.1f}s later (restarted by the {k['restarted_by']}); "
            f"lost to the kill: {r['lost_to_kill']}"
        )
    for name, row in sorted(r["rss"]["per_process"].items()):
        print(
            f"  rss {name:16} {row['start_kb'] / 1024:8.1f} -> {row['end_kb'] / 1024:8.1f} MiB ({row['growth_pct']:+.1f}%)"
        )
    for name, row in sorted(r["rss"]["restarted"].items()):
        print(
            f"  rss {name:16} pid {row['start_pid']} -> {row['end_pid']} (restarted; not in the growth)"
        )
    lk = r["leaks"]
    absent = (
        " (gauge absent, counted 0)" if "trident_kv_leases_active" in lk["gauges_absent"] else ""
    )
    for label, x in (("at idle", lk["at_idle"]), ("headline", lk), ("final", lk["final"])):
        after = x.get("after_s", lk["read_after_s"])
        print(
            f"  left {label} (+{after:.0f}s): blocks used {x['blocks_used']:.0f}, held {x['blocks_held']:.0f}, "
            f"leases {x['leases']:.0f}{absent}, requests in flight {x['inflight']:.0f}, new shm entries {x['shm']}"
        )
    start, end = lk["shm_start"], lk["shm_end"]
    print(
        f"  shm: regions {start['regions']} -> {end['regions']}, KV pools {start['kv_pools']} -> {end['kv_pools']}"
        + ("; the killed stub's region is left (not counted)" if lk["killed_region_left"] else "")
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--minutes", type=float, default=30.0, help="minutes of load (fractions allowed)"
    )
    parser.add_argument("--concurrency", type=int, default=4, help="client threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--no-kill", action="store_true", help="do not kill and reload a decode worker"
    )
    parser.add_argument(
        "--restart-wait-s",
        type=float,
        default=30.0,
        help="seconds to wait for the server to restart the killed worker before reloading it here",
    )
    parser.add_argument(
        "--idle-s",
        type=float,
        default=5.0,
        help="idle seconds between the load and the end readings",
    )
    parser.add_argument(
        "--threshold",
        type=int,
        default=128,
        help="disagg_threshold: prompts this long go to prefill",
    )
    parser.add_argument(
        "--long-words",
        type=int,
        default=150,
        help="words of a long prompt (past --threshold tokens)",
    )
    parser.add_argument("--kv-cache-mb", type=int, default=96)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument(
        "--server-log-level", default="warning", choices=LOG_LEVELS, help="log level of the server"
    )
    parser.add_argument(
        "--server-log", default="", help="tritonserver's log file ('' = the launcher's default)"
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results here")
    add_plot_flag(parser)
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args()
    if args.minutes <= 0 or args.concurrency < 1:
        parser.error("--minutes must be positive and --concurrency at least 1")
    setup_logging(args.verbose)

    config = ServeConfig(
        http_port=0,
        grpc_port=0,
        metrics_port=0,
        openai_port=0,
        decode=2,
        prefill=1,
        disagg_threshold=args.threshold,
        dtype=args.dtype,
        kv_cache_mb=args.kv_cache_mb,
        num_threads=1,
        log_level=args.server_log_level,
        server_log=args.server_log,
    )
    load_before = os.getloadavg()
    launcher = Launcher(config, progress=logger.info)
    frontend = None
    try:
        endpoints = launcher.start()
        frontend = start_frontend(config, endpoints, launcher)
        assert frontend is not None
        model = httpx.get(frontend.base_url + "/v1/models", timeout=30).json()["data"][0]["id"]
        prompts = Prompts(args.seed, args.long_words)
        warm_up(frontend.base_url, model, prompts)
        result = soak(args, launcher, frontend, model, prompts)
        load_after = os.getloadavg()
    finally:
        if frontend is not None:
            frontend.stop()
        launcher.stop()
    result.update(
        benchmark="soak",
        args=vars(args),
        config=dataclasses.asdict(config),
        minutes=args.minutes,
        model=model,
        server_log=str(launcher.log_path),
        load_average={"before": load_before, "after": load_after},
    )
    report(result)
    write_json(args.json, result, plot=args.plot, name="soak")
    n = sum(result["requests"].values())
    e = sum(result["unexpected_errors"].values()) + result["lost_to_kill"]  # the router migrates those
    lk = result["leaks"]
    print(
        f"soak: {n} requests, {e} unexpected errors, RSS growth {result['rss']['growth_pct']:.1f}%, "
        f"leaked {lk['blocks']:.0f} blocks {lk['leases']:.0f} leases {lk['shm']} shm"
    )


if __name__ == "__main__":
    main()
