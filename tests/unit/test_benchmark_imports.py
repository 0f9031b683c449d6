"""Benchmark modules share helper modules instead of importing each other in a cycle."""

from __future__ import annotations

import ast
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def imports_of(path: Path) -> set[str]:
    """Every ``benchmarks.*`` module imported anywhere in ``path`` (functions too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "benchmarks":
                found |= {f"benchmarks.{a.name}" for a in node.names}
            elif node.module.startswith("benchmarks."):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("benchmarks.")}
    return found


def test_the_benchmark_modules_import_no_cycle() -> None:
    graph = {f"benchmarks.{p.stem}": imports_of(p) for p in BENCHMARKS.glob("*.py")}
    assert "benchmarks.ingest" not in graph["benchmarks.earn"]
    assert "benchmarks.earn" not in graph["benchmarks.ingest"]
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        if state.get(module) == "done":
            return
        assert state.get(module) != "open", " -> ".join([*path, module])
        state[module] = "open"
        for target in sorted(graph.get(module, set())):
            visit(target, [*path, module])
        state[module] = "done"

    for module in sorted(graph):
        visit(module, [])
