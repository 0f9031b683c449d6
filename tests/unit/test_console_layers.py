"""The console is an entrypoint beside the API: it calls use cases, never an API route
function (``loyalty.api.routes.*``), and every page module is assembled into its router."""

from __future__ import annotations

import ast
import pkgutil
from pathlib import Path

from loyalty.console import pages, routes

CONSOLE = Path(routes.__file__).parent


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, anywhere in it (functions too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return found


def test_no_console_module_imports_an_api_route_module() -> None:
    modules = sorted(CONSOLE.rglob("*.py"))
    assert CONSOLE / "pages" / "members.py" in modules
    for path in modules:
        api_routes = {
            m
            for m in imported_modules(path)
            if m.startswith(("loyalty.api.routes", "loyalty.api.app"))
        }
        assert not api_routes, (path.relative_to(CONSOLE), api_routes)


def test_every_page_module_is_assembled_into_the_console_router() -> None:
    names = {m.name for m in pkgutil.iter_modules(pages.__path__)}
    assert {"members", "rules", "dashboard", "sign_in"} <= names
    for name in sorted(names):
        module = __import__(f"loyalty.console.pages.{name}", fromlist=["router"])
        assert module.router.routes, name
        for route in module.router.routes:
            params = dict.fromkeys(route.param_convertors, "x")
            own = module.router.url_path_for(route.name, **params)
            assert routes.router.url_path_for(route.name, **params) == f"/console{own}", name
