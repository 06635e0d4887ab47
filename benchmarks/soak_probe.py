"""What the soak benchmark (`benchmarks.soak`) measures of the server, and the worker it kills.

Called from the soak's main thread only, at start (after warm-up), at the kill, and at the
end (after the load stops and the server idles):

- `processes(launcher, frontend_pid)`: every live process of the server's process group
  (tritonserver, one `triton_python_backend_stub` per model instance, named after its model
  from its command line) plus the OpenAI frontend (its own process, outside the group), with
  VmRSS from /proc/<pid>/status. A killed stub lingers as a zombie until tritonserver reaps
  it: it has no VmRSS and is left out.
- `rss_growth(start, end)`: processes matched by name; one whose pid changed (the worker that
  was killed and reloaded) is reported apart and left out of the growth, since its new
  process started after the first reading.
- `shm_entries(...)`: /dev/shm entries of this server: python-backend regions under the
  launcher's own prefix, and engine KV pools (`trident_kv_<pid>_...`) of any pid the server
  had; other servers on the machine (other tests) are counted apart, for information.
- `kv_gauges(metrics_url)`: the workers' KV and in-flight gauges from Triton's /metrics.
- `stub_pid`, `wait_for_restart`, `reload_worker`: the kill-and-restart step.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from planner.metrics import scrape
from trident.core.errors import TridentError
from trident.launcher import (
    ENGINE_SHM_PREFIX,
    REPO_ROOT,
    SHM_DIR,
    SHM_PREFIX,
    STUB_NAME,
    Launcher,
    group_pids,
)
from trident.model_control import load_replica

# Gauges that must be back to 0 once the server is idle. `trident_kv_leases_active` is newer
# than the others: a server without it reports it as absent (counted as 0).
LEAK_GAUGES = (
    "trident_kv_blocks_used",
    "trident_kv_blocks_held",
    "trident_kv_leases_active",
    "trident_requests_inflight",
)
_INSTANCE = re.compile(
    r"^(?P<model>.+)_\d+_\d+$"
)  # a stub's instance name: <model>_<group>_<index>


@dataclass(frozen=True, slots=True)
class Proc:
    name: str  # "tritonserver", "stub:<model>", "frontend", or the command's name
    pid: int
    rss_kb: int


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def rss_kb(pid: int) -> int | None:
    """VmRSS of `pid` in KiB; None for a process that is gone or a zombie."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return None


def process_name(pid: int) -> str:
    args = _cmdline(pid)
    if not args:
        return ""
    exe = Path(args[0]).name
    if exe == STUB_NAME:
        for arg in args[1:]:
            match = _INSTANCE.match(arg)
            if match:
                return f"stub:{match['model']}"
        return "stub:?"
    return exe


def processes(launcher: Launcher, frontend_pid: int | None) -> list[Proc]:
    """The server's live processes and the frontend, sorted by name."""
    pids = group_pids(server_pid(launcher))
    named = {pid: process_name(pid) for pid in pids}
    if frontend_pid is not None:
        named[frontend_pid] = "frontend"
    out = []
    for pid, name in named.items():
        rss = rss_kb(pid)
        if name and rss is not None:
            out.append(Proc(name, pid, rss))
    return sorted(out, key=lambda p: (p.name, p.pid))


def server_pid(launcher: Launcher) -> int:
    """tritonserver's pid, which is also its process group's id (the launcher starts a session)."""
    proc = launcher._proc  # the launcher exposes no pid; the tests read it the same way
    if proc is None:
        raise RuntimeError("the server is not running")
    return proc.pid


def stub_pid(launcher: Launcher, model: str) -> int:
    """The pid of `model`'s Python stub (its only instance)."""
    for proc in processes(launcher, None):
        if proc.name == f"stub:{model}":
            return proc.pid
    raise RuntimeError(f"no stub process for {model}")


def stub_region(pid: int) -> str:
    """The python-backend shared-memory region a stub was started with ('' if unknown)."""
    return next((arg for arg in _cmdline(pid) if arg.startswith(SHM_PREFIX)), "")


def wait_for_restart(
    launcher: Launcher, model: str, old_pid: int, wait_s: float, ready_s: float = 120.0
) -> int | None:
    """The pid of `model`'s new stub once the server has restarted it by itself (the
    launcher's stub supervisor, where it has one) and the model is ready again; None if no
    new stub appeared within `wait_s`."""
    assert launcher.control is not None
    t0 = time.monotonic()
    while True:
        pid = next((p.pid for p in processes(launcher, None) if p.name == f"stub:{model}"), None)
        if pid is not None and pid != old_pid and launcher.control.is_ready(model):
            return pid
        waited = time.monotonic() - t0
        if waited > (ready_s if pid not in (None, old_pid) else wait_s):
            return None
        time.sleep(0.5)


def reload_worker(
    launcher: Launcher, model: str, pool: str = "decode", timeout_s: float = 120.0
) -> float:
    """Unload `model`, wait until the server no longer lists it ready, load it again as the
    launcher first loaded it (blocks until it is ready). Returns the unload's seconds.

    A plain load of the still-loaded model is no reload: with the config unchanged, Triton
    answers "successfully loaded" at once and keeps the instance whose stub is dead."""
    control = launcher.control
    assert control is not None
    t0 = time.monotonic()
    control.unload(model)
    while control.is_ready(model):
        if time.monotonic() - t0 > timeout_s:
            raise TridentError(f"{model} still ready {timeout_s:.0f}s after its unload")
        time.sleep(0.2)
    unload_s = time.monotonic() - t0
    template = str(launcher.repository / pool)
    load_replica(
        control, template, model, parameters={"trident_root": str(REPO_ROOT)}, timeout_s=timeout_s
    )
    return unload_s


def rss_growth(start: list[Proc], end: list[Proc]) -> dict[str, Any]:
    """Per-process and total RSS growth; restarted and vanished processes reported apart."""
    before = {p.name: p for p in start}
    after = {p.name: p for p in end}
    rows: dict[str, Any] = {}
    restarted: dict[str, Any] = {}
    total_start = total_end = 0
    for name in sorted(before.keys() | after.keys()):
        a, b = before.get(name), after.get(name)
        row = {
            "start_pid": a.pid if a else None,
            "start_kb": a.rss_kb if a else None,
            "end_pid": b.pid if b else None,
            "end_kb": b.rss_kb if b else None,
        }
        if a is not None and b is not None and a.pid == b.pid:
            row["growth_pct"] = 100.0 * (b.rss_kb - a.rss_kb) / a.rss_kb
            total_start += a.rss_kb
            total_end += b.rss_kb
            rows[name] = row
        else:  # killed and reloaded (new pid), or present at one end only
            restarted[name] = row
    growth = 100.0 * (total_end - total_start) / total_start if total_start else 0.0
    return {
        "per_process": rows,
        "restarted": restarted,
        "start_kb": total_start,
        "end_kb": total_end,
        "growth_pct": growth,
        "note": "growth over processes with the same pid at start and end; a restarted process "
        "(the killed worker) is listed under 'restarted' and left out",
    }


def shm_entries(launcher: Launcher, server_pids: set[int], skip: str = "") -> dict[str, int]:
    """Counts of /dev/shm entries: this server's (`regions`, `kv_pools`) and everyone's;
    `skip` is left out of the counts."""
    names = [p.name for p in SHM_DIR.iterdir() if p.name != skip] if SHM_DIR.is_dir() else []
    ours_kv = 0
    for name in names:
        if name.startswith(ENGINE_SHM_PREFIX):
            pid = name[len(ENGINE_SHM_PREFIX) :].split("_", 1)[0]
            if pid.isdigit() and int(pid) in server_pids:
                ours_kv += 1
    regions = sum(name.startswith(launcher.shm_prefix) for name in names)
    return {
        "regions": regions,
        "kv_pools": ours_kv,
        "all_regions": sum(name.startswith(SHM_PREFIX) for name in names),
        "all_kv_pools": sum(name.startswith(ENGINE_SHM_PREFIX) for name in names),
    }


def kv_gauges(metrics_url: str) -> dict[str, Any]:
    """`{gauge: {"total": sum over workers, "workers": {worker: value}}}` for `LEAK_GAUGES`;
    `"absent"` lists the gauges the server does not publish."""
    samples = scrape(metrics_url, 0.0).samples
    out: dict[str, Any] = {"absent": []}
    for gauge in LEAK_GAUGES:
        workers = {
            dict(labels).get("worker", "?"): value
            for (name, labels), value in samples.items()
            if name == gauge
        }
        if not workers:
            out["absent"].append(gauge)
        out[gauge] = {"total": sum(workers.values()), "workers": workers}
    return out
