"""`python -m benchmarks.soak` end to end, very short (24 s of load, the kill and reload
included), in a subprocess: one run, read by two tests. The first checks the benchmark's
report (JSON shape, last line); the second that the server came through it clean (no
unexpected error, nothing left behind), so a server regression fails only the second."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
LAST_LINE = re.compile(
    r"^soak: (\d+) requests, (\d+) unexpected errors, RSS growth (-?\d+\.\d)%, "
    r"leaked (\d+) blocks (\d+) leases (\d+) shm$"
)
PROCESSES = {
    "tritonserver",
    "stub:router",
    "stub:decode",
    "stub:decode_1",
    "stub:prefill",
    "frontend",
}

# tritonserver with 2 decode + 1 prefill workers and the frontend, 24 s of load, a worker
# reload, up to a lease TTL of waiting for leftovers: about 2 minutes on 2 cores.
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(400)]


@pytest.fixture(scope="module")
def soak_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, Any]]:
    out = tmp_path_factory.mktemp("soak") / "soak.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.soak", "--minutes", "0.4", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=360,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout.strip().splitlines()[-1], json.loads(out.read_text())


def test_the_soak_reports_requests_memory_and_leftovers(
    soak_run: tuple[str, dict[str, Any]],
) -> None:
    last, data = soak_run
    match = LAST_LINE.match(last)
    assert match, last
    n, e, growth, blocks, leases, shm = match.groups()
    assert int(n) == sum(data["requests"].values()) > 0
    assert sum(data["completed"].values()) > 0
    assert int(e) == sum(data["unexpected_errors"].values()) + data["lost_to_kill"]
    assert float(growth) == pytest.approx(data["rss"]["growth_pct"], abs=0.051)
    leaks = data["leaks"]
    assert (int(blocks), int(leases), int(shm)) == (
        round(leaks["blocks"]),
        round(leaks["leases"]),
        leaks["shm"],
    )

    assert data["benchmark"] == "soak" and data["minutes"] == 0.4
    assert (data["config"]["decode"], data["config"]["prefill"]) == (2, 1)
    assert set(data["requests"]) <= {
        "chat",
        "chat_stream",
        "completion",
        "completion_stream",
        "cancel",
        "disconnect",
        "bad_input",
    }
    assert isinstance(data["expected_errors"], dict) and isinstance(data["lost_to_kill"], int)
    assert data["ended"] > data["started"]
    assert set(data["load_average"]) == {"before", "after"}

    kill = data["kill"]
    assert kill["worker"] in ("decode", "decode_1") and not kill["reload_error"], kill
    assert kill["restarted_by"] in ("server", "soak")
    assert kill["new_pid"] and kill["new_pid"] != kill["pid"]

    rss = data["rss"]
    assert {p["name"] for p in rss["start"]} == PROCESSES == {p["name"] for p in rss["end"]}
    assert set(rss["restarted"]) == {f"stub:{kill['worker']}"}
    assert set(rss["per_process"]) == PROCESSES - {f"stub:{kill['worker']}"}
    assert all(row["start_kb"] > 0 and row["end_kb"] > 0 for row in rss["per_process"].values())

    for key in ("blocks", "blocks_used", "blocks_held", "leases", "inflight", "shm"):
        assert key in leaks and key in leaks["at_idle"] and key in leaks["final"]
    assert {"regions", "kv_pools"} <= set(leaks["shm_start"]) & set(leaks["shm_end"])


def test_the_server_comes_through_the_soak_clean(soak_run: tuple[str, dict[str, Any]]) -> None:
    _, data = soak_run
    assert data["unexpected_errors"] == {}, data["error_samples"]
    assert data["lost_to_kill"] == 0  # requests on the killed worker were migrated
    leaks = data["leaks"]
    left = {k: leaks[k] for k in ("blocks", "leases", "inflight", "shm")}
    assert left == {"blocks": 0, "leases": 0, "inflight": 0, "shm": 0}, (
        leaks["at_idle"],
        leaks["final"],
    )
