"""`python -m benchmarks.kv_transfer --transport nixl` end to end with a tiny time budget: both
phases (UCX's choice, UCX forced to TCP) run in their own processes and report every size."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow  # four processes importing torch: ~15 s on 2 cores
pytest.importorskip("nixl_cu12", reason="NIXL (nixl-cu12) is installed by make test")


def test_the_nixl_benchmark_reports_both_phases(tmp_path: Path) -> None:
    out = tmp_path / "nixl.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.kv_transfer", "--transport", "nixl", "--budget-s", "0.001",
         "--pool-blocks", "256", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("kv transfer nixl: ") and "% of memcpy, tcp " in last, last
    data = json.loads(out.read_text())
    assert set(data["phases"]) == {"default", "tcp"}
    for phase in data["phases"].values():
        assert [r["blocks"] for r in phase["rows"]] == [1 << i for i in range(9)]
        assert all(r["pull_gbps"] > 0 and r["ref_gbps"] > 0 for r in phase["rows"])
