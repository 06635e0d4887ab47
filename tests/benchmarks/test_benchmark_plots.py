"""`--plot` (benchmarks.plots): a real benchmark run writes its PNGs beside its JSON, and the
series figures (TTFT CDF per policy, TTFT/ITL per serving mode, replicas over a ramp) come
from payloads shaped as routing.py, disagg.py and planner.py write them."""

from __future__ import annotations

import argparse
import ast
import json
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest

from benchmarks.plots import numeric_leaves, write_plots

ROOT = Path(__file__).resolve().parents[2]
BENCHMARKS = ROOT / "benchmarks"


def png_ok(path: Path) -> bool:
    image = matplotlib.image.imread(path)
    return image.shape[0] > 100 and image.shape[1] > 100 and float(image.std()) > 0.01


@pytest.mark.slow
def test_router_decision_benchmark_writes_plots_beside_its_json(tmp_path: Path) -> None:
    out = tmp_path / "decision.json"
    args = ["--iterations", "40", "--warmup", "5", "--tokens", "256", "--background-blocks", "200"]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.router_decision",
            *args,
            "--no-dynamo",
            "--json",
            str(out),
            "--plot",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(out.read_text())["decision_ms"]["p50"] > 0
    png = tmp_path / "decision.png"
    assert png.is_file() and png_ok(png)


def test_series_figures_from_routing_disagg_and_planner_payloads(tmp_path: Path) -> None:
    routing = {
        "runs": [
            {
                "policy": "kv",
                "ttft_mean_s": 0.2,
                "per_request": [[0, "decode", 0.1 * i, 32] for i in range(1, 9)],
            },
            {
                "policy": "random",
                "ttft_mean_s": 0.4,
                "per_request": [[0, "decode_1", 0.2 * i, 0] for i in range(1, 9)],
            },
        ]
    }
    written = write_plots(str(tmp_path / "routing.json"), routing)
    assert [p.name for p in written] == ["routing.png", "routing_ttft_cdf.png"]
    rows = [
        {
            "kind": "short",
            "ttft_s": 0.05 * i,
            "itl_series": [[0.1 * i + 0.01 * j, 20.0 + j] for j in range(5)],
        }
        for i in range(1, 6)
    ]
    disagg = {
        "benchmark": "disagg",
        "results": {
            "aggregated": {"itl_p99_ms": 30.0, "per_request": rows},
            "disaggregated": {"itl_p99_ms": 20.0, "per_request": rows},
        },
    }
    names = [p.name for p in write_plots(str(tmp_path / "disagg.json"), disagg)]
    assert names == ["disagg.png", "disagg_ttft_cdf.png", "disagg_itl.png"]
    planner = {
        "runs": [{"kind": "planner", "ttft_p50_s": 0.3, "replicas": [[0, 1], [30, 2], [90, 1]]}]
    }
    names = [p.name for p in write_plots(str(tmp_path / "planner.json"), planner)]
    assert names == ["planner.png", "planner_replicas.png"]
    for png in tmp_path.glob("*.png"):
        assert png_ok(png), png


def test_numeric_leaves_skip_flags_and_non_finite_values() -> None:
    leaves = numeric_leaves(
        {"a": 1, "b": True, "c": float("nan"), "d": {"e": 2.5}, "per_request": [1]}
    )
    assert leaves == [("a", 1.0), ("d.e", 2.5)]


def _has_plot_flag(path: Path) -> bool:
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = getattr(node.func, "id", getattr(node.func, "attr", ""))
            if name == "add_plot_flag":
                return True
            if name == "add_argument" and any(
                isinstance(a, ast.Constant) and a.value == "--plot" for a in node.args
            ):
                return True
    return False


def test_every_benchmark_with_a_json_flag_has_plot() -> None:
    with_json = [
        p
        for p in sorted(BENCHMARKS.rglob("*.py"))
        if '"--json"' in p.read_text() and p.name != "plots.py"
    ]
    assert len(with_json) >= 14
    missing = [str(p.relative_to(ROOT)) for p in with_json if not _has_plot_flag(p)]
    # engine_structured and kv_transfer_nixl are run through engine.py and kv_transfer.py's flags
    assert missing == [], missing
    parser = argparse.ArgumentParser()
    from benchmarks.plots import add_plot_flag

    assert add_plot_flag(parser).parse_args(["--plot"]).plot is True
