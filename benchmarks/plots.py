"""PNG plots of a benchmark's JSON results, for every benchmark's `--plot` flag.

A benchmark calls `add_plot_flag(parser)` and hands its payload to `common.write_json(path,
payload, plot=args.plot)` (or to `write_plots` directly). `write_plots` writes, beside the
JSON (`results.json` -> `results.png`, `results_<figure>.png`; without a JSON path, into the
working directory under the benchmark's name):

- `<stem>.png`: every numeric result as a bar, one panel per run (the payload's `runs` /
  `results` / `rows` entries, else the whole payload), so any benchmark gets a picture;
- figures for the series a payload carries, recognised by their keys: a TTFT CDF per routing
  policy (`runs[].policy` + `per_request`), TTFT CDFs and ITL over time per serving mode
  (`results.<mode>.per_request`), replicas over a load ramp (`runs[].replicas`), and any
  `[[t, value], ...]` time series named `*_series`.

Runs on the benchmark's main thread after it finished; matplotlib's Agg backend, no display.
"""

from __future__ import annotations

import argparse
import logging
import math
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

MAX_BARS = 24  # per panel; beyond this a panel keeps the first ones
Draw = Callable[[Any], None]  # draws on one matplotlib Axes


def add_plot_flag(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument(
        "--plot", action="store_true", help="also write PNG plots beside --json (benchmarks.plots)"
    )
    return parser


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def stem_for(json_path: str | None, name: str) -> Path:
    return Path(json_path).with_suffix("") if json_path else Path(name)


def numeric_leaves(value: Any, prefix: str = "", depth: int = 2) -> list[tuple[str, float]]:
    """(dotted key, number) of the finite numbers in `value`, `depth` levels of dicts down."""
    out: list[tuple[str, float]] = []
    if isinstance(value, bool):
        return out
    if isinstance(value, int | float):
        if math.isfinite(value):
            out.append((prefix or "value", float(value)))
        return out
    if isinstance(value, Mapping) and depth >= 0:
        for key in sorted(value):
            if key in ("args", "per_request", "requests_detail"):
                continue
            out += numeric_leaves(value[key], f"{prefix}.{key}" if prefix else str(key), depth - 1)
    return out


def _runs(payload: Mapping[str, Any]) -> list[tuple[str, Any]]:
    for key in ("runs", "results", "rows", "stats"):
        runs = payload.get(key)
        if isinstance(runs, Mapping) and runs:
            return [(str(k), v) for k, v in runs.items()]
        if isinstance(runs, list) and runs and all(isinstance(r, Mapping) for r in runs):
            return [(_label(r, i), r) for i, r in enumerate(runs)]
    return [("results", payload)]


def _label(run: Mapping[str, Any], index: int) -> str:
    for key in ("policy", "kind", "mode", "name", "label", "engine"):
        if isinstance(run.get(key), str):
            return run[key]
    return f"run {index}"


def summary_figure(path: Path, payload: Mapping[str, Any], title: str) -> Path | None:
    panels = [(label, numeric_leaves(run)[:MAX_BARS]) for label, run in _runs(payload)]
    panels = [(label, bars) for label, bars in panels if bars][:12]
    if not panels:
        return None
    plt = _pyplot()
    height = max(2.5, 0.28 * max(len(bars) for _, bars in panels) + 1.0)
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, height * len(panels)), squeeze=False)
    for ax, (label, bars) in zip(axes[:, 0], panels, strict=True):
        names = [n for n, _ in bars]
        ax.barh(range(len(bars)), [v for _, v in bars], color="tab:blue")
        ax.set_yticks(range(len(bars)), names, fontsize=8)
        ax.invert_yaxis()
        ax.set_title(label, fontsize=10)
        if all(v > 0 for _, v in bars) and max(v for _, v in bars) / min(v for _, v in bars) > 1e3:
            ax.set_xscale("log")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def cdf(ax: Any, samples: Iterable[float], label: str) -> None:
    xs = sorted(x for x in samples if isinstance(x, int | float) and math.isfinite(x))
    if xs:
        ax.step(
            xs,
            [(i + 1) / len(xs) for i in range(len(xs))],
            where="post",
            label=f"{label} (n={len(xs)})",
        )


def figure(
    path: Path, draw: Draw, title: str, xlabel: str, ylabel: str, logx: bool = False
) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    draw(ax)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logx:
        ax.set_xscale("log")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def series_figures(stem: Path, payload: Mapping[str, Any]) -> list[Path]:
    """The figures of the series `payload` carries (see the module docstring)."""
    out: list[Path] = []
    runs = payload.get("runs")
    if isinstance(runs, list) and any(isinstance(r, Mapping) and "per_request" in r for r in runs):

        def ttft_per_policy(ax: Any) -> None:
            for r in runs:
                cdf(ax, (row[2] for row in r.get("per_request", []) if len(row) > 2), _label(r, 0))

        out.append(
            figure(
                Path(f"{stem}_ttft_cdf.png"),
                ttft_per_policy,
                "TTFT CDF per policy",
                "TTFT (s)",
                "fraction",
                True,
            )
        )
    results = payload.get("results")
    if isinstance(results, Mapping) and any(
        isinstance(r, Mapping) and "per_request" in r for r in results.values()
    ):
        modes = {
            m: r["per_request"]
            for m, r in results.items()
            if isinstance(r, Mapping) and "per_request" in r
        }

        def ttft_per_mode(ax: Any) -> None:
            for mode, rows in modes.items():
                cdf(ax, (row["ttft_s"] for row in rows), mode)

        def itl_over_time(ax: Any) -> None:
            for mode, rows in modes.items():
                points = sorted((t, itl) for row in rows for t, itl in row.get("itl_series", []))
                ax.plot(
                    [p[0] for p in points],
                    [p[1] for p in points],
                    ".",
                    markersize=2,
                    alpha=0.6,
                    label=mode,
                )

        out.append(
            figure(
                Path(f"{stem}_ttft_cdf.png"),
                ttft_per_mode,
                "TTFT CDF per mode",
                "TTFT (s)",
                "fraction",
                True,
            )
        )
        out.append(
            figure(
                Path(f"{stem}_itl.png"),
                itl_over_time,
                "ITL over time",
                "seconds into the run",
                "ITL (ms)",
            )
        )
    if isinstance(runs, list) and any(isinstance(r, Mapping) and r.get("replicas") for r in runs):

        def replicas(ax: Any) -> None:
            for r in runs:
                if r.get("replicas"):
                    samples = r["replicas"]
                    ax.step(
                        [s[0] for s in samples],
                        [s[1] for s in samples],
                        where="post",
                        label=_label(r, 0),
                    )

        out.append(
            figure(
                Path(f"{stem}_replicas.png"),
                replicas,
                "Replicas over the ramp",
                "seconds",
                "decode workers",
            )
        )
    for key, value in sorted(payload.items()):
        if (
            key.endswith("_series")
            and isinstance(value, list)
            and value
            and all(len(p) == 2 for p in value)
        ):

            def one_series(ax: Any, value: list = value, key: str = key) -> None:
                ax.plot([p[0] for p in value], [p[1] for p in value], label=key)

            out.append(figure(Path(f"{stem}_{key}.png"), one_series, key, "t", key))
    return out


def write_plots(
    json_path: str | None, payload: Mapping[str, Any], name: str = "benchmark"
) -> list[Path]:
    """Write the PNGs of `payload` beside `json_path`; return their paths."""
    stem = stem_for(json_path, name)
    title = str(payload.get("benchmark", name))
    written = [p for p in [summary_figure(Path(f"{stem}.png"), payload, title)] if p is not None]
    written += series_figures(stem, payload)
    for path in written:
        logger.info("plot: %s", path)
    return written
