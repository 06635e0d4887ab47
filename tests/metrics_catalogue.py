"""The metric catalogue (`docs/metrics.md`) and what a `/metrics` page exposes, for the tests
that compare them (tests/frontend/test_metrics_catalogue.py, tests/docker/test_grafana_dashboard.py,
tests/planner/test_planner_exporter.py)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

CATALOGUE = Path(__file__).resolve().parent.parent / "docs" / "metrics.md"
ROW = re.compile(
    r"^\| `(?P<name>\w+)` \| (?P<kind>\w+) \| (?P<labels>[\w, ]*) \| (?P<emitter>\w+) \| (?P<when>[^|]+) \|"
)
SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][\w:]*)(?:\{(?P<labels>.*)\})? \S+$")
LABEL = re.compile(r'(\w+)="(?:[^"\\]|\\.)*"')
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


@dataclass(frozen=True, slots=True)
class Entry:
    name: str
    kind: str  # counter, gauge, histogram
    labels: frozenset[str]
    emitter: str  # worker, router, frontend, planner
    when: str  # always, after a request, or a condition


@dataclass(frozen=True, slots=True)
class Family:
    kind: str
    labels: frozenset[str]  # the label names of its samples (`le` left out)
    samples: int


def catalogue(path: Path = CATALOGUE) -> dict[str, Entry]:
    entries: dict[str, Entry] = {}
    for line in path.read_text().splitlines():
        m = ROW.match(line)
        if m is None:
            continue
        labels = frozenset(x.strip() for x in m["labels"].split(",") if x.strip())
        entries[m["name"]] = Entry(m["name"], m["kind"], labels, m["emitter"], m["when"].strip())
    return entries


def families(text: str, prefix: str = "trident_") -> dict[str, Family]:
    """The families named `prefix...` of an exposition: TYPE lines, and their samples' labels."""
    kinds: dict[str, str] = {}
    labels: dict[str, set[str]] = {}
    counts: dict[str, int] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(maxsplit=3)
            if name.startswith(prefix):
                kinds[name] = kind
                labels.setdefault(name, set())
                counts.setdefault(name, 0)
            continue
        m = SAMPLE.match(line)
        if m is None or not m["name"].startswith(prefix):
            continue
        name = m["name"]
        if name not in kinds:
            name = next((name[: -len(s)] for s in HISTOGRAM_SUFFIXES if name.endswith(s)), name)
        labels.setdefault(name, set()).update(
            k for k in LABEL.findall(m["labels"] or "") if k != "le"
        )
        counts[name] = counts.get(name, 0) + 1
    return {
        n: Family(kinds.get(n, "untyped"), frozenset(labels[n]), counts.get(n, 0)) for n in labels
    }


DASHBOARD = (
    Path(__file__).resolve().parent.parent / "docker" / "grafana" / "dashboards" / "trident.json"
)
PROMQL_WORDS = {
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
}
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_IDENT = re.compile(r"[A-Za-z_:][\w:]*")


def promql_series(expr: str) -> set[str]:
    """The series names a PromQL expression selects (`x_bucket` stays `x_bucket`); raises
    ValueError on unbalanced brackets or a selector inside a string-free leftover."""
    pairs = {")": "(", "]": "[", "}": "{"}
    stack: list[str] = []
    for ch in _STRING.sub('""', expr):
        if ch in "([{":
            stack.append(ch)
        elif ch in pairs:
            if not stack or stack.pop() != pairs[ch]:
                raise ValueError(f"unbalanced {ch!r} in {expr!r}")
    if stack:
        raise ValueError(f"unclosed {stack[-1]!r} in {expr!r}")
    text = _GROUPING.sub(" ", _RANGE.sub(" ", _MATCHERS.sub(" ", _STRING.sub(" ", expr))))
    names = set()
    for m in _IDENT.finditer(text):
        following = text[m.end() :].lstrip()
        if following.startswith("(") or m[0] in PROMQL_WORDS:
            continue  # a function or an operator keyword
        names.add(m[0])
    return names


def dashboard_queries(path: Path = DASHBOARD) -> list[tuple[str, str]]:
    """(panel title, expr) of every target of every panel, rows included."""
    import json

    out: list[tuple[str, str]] = []

    def walk(panels: list[dict]) -> None:
        for panel in panels:
            out.extend((panel["title"], t["expr"]) for t in panel.get("targets", []))
            walk(panel.get("panels", []))

    walk(json.loads(path.read_text())["panels"])
    return out


def dashboard_families(path: Path = DASHBOARD) -> set[str]:
    """The metric families the dashboard queries (histogram series folded into their family)."""
    entries = catalogue()
    found = set()
    for _, expr in dashboard_queries(path):
        for name in promql_series(expr):
            base = next((name[: -len(s)] for s in HISTOGRAM_SUFFIXES if name.endswith(s)), name)
            found.add(base if base in entries and entries[base].kind == "histogram" else name)
    return found
