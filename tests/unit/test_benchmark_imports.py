"""Benchmark modules share helper modules instead of importing each other (STYLE.md):
a module that registers benchmarks imports no other such module, and nothing cycles."""

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


def registers_benchmarks(path: Path) -> bool:
    """Whether ``path`` registers a benchmark (a function decorated ``@benchmark(...)``)."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            for deco in node.decorator_list:
                call = deco.func if isinstance(deco, ast.Call) else deco
                if isinstance(call, ast.Name) and call.id == "benchmark":
                    return True
    return False


def test_benchmark_modules_import_helpers_not_each_other() -> None:
    modules = {f"benchmarks.{p.stem}": p for p in BENCHMARKS.glob("*.py")}
    benchmark_modules = {name for name, path in modules.items() if registers_benchmarks(path)}
    assert {"benchmarks.ingest", "benchmarks.earn", "benchmarks.accounts"} <= benchmark_modules
    crossing = {
        name: sorted(imports_of(modules[name]) & benchmark_modules - {name})
        for name in sorted(benchmark_modules)
    }
    assert {k: v for k, v in crossing.items() if v} == {}


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
