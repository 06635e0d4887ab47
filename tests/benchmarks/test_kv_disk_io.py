"""`python -m benchmarks.kv_disk_io` end to end on 4 blocks and 1 round, in a subprocess (NIXL
is imported under the name `nixl` there, which must not leak into this process).

The plain side always runs; the NIXL side runs when `nixl_cu12` imports and is checked then."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow  # two subprocesses importing torch: ~10 s on 2 cores
HAVE_NIXL = importlib.util.find_spec("nixl_cu12") is not None


def run_bench(tmp_path: Path, *extra: str) -> tuple[dict, str]:
    out = tmp_path / "kv_disk_io.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.kv_disk_io",
            "--blocks",
            "4",
            "--rounds",
            "1",
            "--dir",
            str(tmp_path),
            "--json",
            str(out),
            *extra,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    res = json.loads(out.read_text())
    last = proc.stdout.strip().splitlines()[-1]
    assert last == res["last_line"]
    assert not [p for p in tmp_path.iterdir() if p != out]  # block files cleaned up
    return res, last


def check_side(side: dict) -> None:
    for phase in ("write", "read_warm", "read_cold"):
        assert len(side[phase]["samples_s"]) == 1
        assert side[phase]["median_s"] > 0 and side[phase]["gbps"] > 0


def test_plain_side_alone(tmp_path: Path) -> None:
    res, last = run_bench(tmp_path, "--no-nixl")
    assert res["blocks"] == 4 and res["block_nbytes"] == 30 * 2 * 16 * 3 * 64 * 2
    assert res["fsync_on_write"] is False and res["nixl"] is False
    assert len(res["loadavg_before"]) == 3 and res["cpu_affinity"]
    assert list(res["sides"]) == ["plain"] and res["plain_over_nixl"] is None
    check_side(res["sides"]["plain"])
    assert last.startswith("kv disk io: plain file I/O only (--no-nixl): write ")


@pytest.mark.skipif(not HAVE_NIXL, reason="nixl_cu12 is not installed (make setup-peers)")
def test_plain_against_nixl_posix(tmp_path: Path) -> None:
    res, last = run_bench(tmp_path)
    assert res["nixl"] is True and res["nixl_io_queue"] == "default"
    assert sorted(res["sides"]) == ["nixl", "plain"]
    for side in res["sides"].values():
        check_side(side)
    ratio = res["plain_over_nixl"]
    assert set(ratio) == {"write", "read_warm", "read_cold"}
    assert last == (
        f"kv disk io: NIXL POSIX write {ratio['write']:.2f}x, read {ratio['read_warm']:.2f}x "
        "plain file I/O"
    )
