"""`python -m benchmarks.engine --structured` end to end on a short run, in a subprocess:
it measures both sides, no constrained request ends before --new-tokens (the schema's
shortest answer is longer), and the headline is the last line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow  # loads SmolLM2 and decodes 4 batches of 16: ~1 min on 2 cores


def test_structured_bench_runs(tmp_path: Path) -> None:
    out = tmp_path / "structured.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.engine",
            "--structured",
            "--repeats",
            "1",
            "--new-tokens",
            "6",
            "--prompt-words",
            "4",
            "--threads",
            "2",
            "--json",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1].startswith("structured: batch16 decode ")
    result = json.loads(out.read_text())
    for side in ("unconstrained", "json_schema"):
        assert result["stats"][side]["decode_tok_s"]["median"] > 0
        assert result["stats"][side]["ended_early"]["max"] == 0
    assert result["ratio"] > 0 and set(result["loadavg"]) == {"before", "start", "after"}
