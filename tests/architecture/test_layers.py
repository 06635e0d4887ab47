"""The import graph: layers run one way, and no module imports another in a circle.

Read statically with `ast` (imports inside functions count too), so a lazy import cannot
hide a cycle. The layers, bottom to top (ARCHITECTURE.md, "Layers"):

    trident <- kv_manager <- plugins <- router_ensemble | planner | frontend <- benchmarks

`trident` is the ground (`trident.core`, the launcher, the clients); the Triton edges sit at
the top of their own packages (`plugins.triton`, `router_ensemble.triton`). A module may
import its own package and any lower layer, never a higher one nor a sibling package of its
layer; top-level packages form no cycle.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# unit -> rank; a module belongs to the longest unit its dotted name starts with
LAYERS = {
    "trident": 0,
    "kv_manager": 1,
    "plugins": 2,
    "router_ensemble": 3,
    "planner": 3,
    "frontend": 3,
    "benchmarks": 4,
}
TOP_PACKAGES = {unit.split(".")[0] for unit in LAYERS}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def our_modules() -> dict[str, Path]:
    out = {}
    for top in sorted(TOP_PACKAGES):
        for path in (ROOT / top).rglob("*.py"):
            out[module_name(path)] = path
    return out


def imports_of(name: str, path: Path, known: dict[str, Path]) -> Iterator[str]:
    """Our modules that `name` imports (a `from pkg import mod` names the module `pkg.mod`)."""
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets = [module] + [f"{module}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            if target.split(".")[0] in TOP_PACKAGES and target in known:
                yield target


def unit_of(module: str) -> str:
    return max((u for u in LAYERS if module == u or module.startswith(u + ".")), key=len)


def graph() -> dict[str, set[str]]:
    known = our_modules()
    return {name: set(imports_of(name, path, known)) - {name} for name, path in known.items()}


def test_imports_run_down_the_layers() -> None:
    wrong = []
    for module, targets in graph().items():
        unit = unit_of(module)
        for target in targets:
            other = unit_of(target)
            if other != unit and LAYERS[other] >= LAYERS[unit]:
                wrong.append(f"{module} ({unit}) imports {target} ({other})")
    assert not wrong, "imports against the layers:\n" + "\n".join(sorted(wrong))


def test_no_import_cycle_between_modules() -> None:
    cycles = _cycles(graph())
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_no_cycle_between_top_level_packages() -> None:
    edges: dict[str, set[str]] = {u: set() for u in LAYERS}
    for module, targets in graph().items():
        for target in targets:
            if unit_of(target) != unit_of(module):
                edges[unit_of(module)].add(unit_of(target))
    assert not _cycles(edges)


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one node (Tarjan), as a path."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return out
