"""The console's pages as HTML: the Jinja2 environment, its filters and globals, the
Content-Security-Policy every page carries, and :func:`render`."""

from __future__ import annotations

import json
from collections.abc import Mapping
from decimal import Decimal
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse
from jinja2 import Environment, FileSystemLoader, select_autoescape

from loyalty.adapters.erasure_store import LOCATION_NAMES
from loyalty.application.compensation import COMPENSATION_PREFIX
from loyalty.application.delivery import EVENT_TYPES
from loyalty.application.explain import PENDING_ALIAS
from loyalty.application.rule_history import shown

HERE = Path(__file__).parent
STATIC = HERE / "static"
PREFIX = "/console"
CSP = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self'",
        "connect-src 'self'",
        "form-action 'self'",
        "frame-ancestors 'none'",
        "base-uri 'none'",
    ]
)
HTMX_CONFIG = json.dumps(
    {
        "includeIndicatorStyles": False,  # they would be an inline <style>
        "allowEval": False,
        "allowScriptTags": False,
        "selfRequestsOnly": True,
        "historyCacheSize": 0,  # pages hold member data: never in localStorage
        # errors are answered with their status and swapped in place
        "responseHandling": [
            {"code": "204", "swap": False},
            {"code": "[23]..", "swap": True},
            {"code": "[45]..", "swap": True, "error": True},
        ],
    }
)
NAV: list[tuple[str, str, str]] = [
    ("dashboard", "Dashboard", "/"),
    ("members", "Members", "/members"),
    ("rules", "Rules", "/rules"),
    ("reports", "Reports", "/reports"),
    ("forget", "Forget-me", "/forget"),
    ("keys", "Keys", "/keys"),
    ("webhooks", "Webhooks", "/webhooks"),
]
"""The sections (a new page: a template, a module under ``pages/``, a line here and one
in ``routes.py``)."""


def figure(value: object) -> str:
    """A count or amount with thousands separators (``12,273``; ``12,273.5`` for an exact
    decimal given as its wire string); anything else as it is."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, str | Decimal):
        try:
            number = Decimal(value)
        except ArithmeticError:
            return str(value)
        whole, _, fraction = str(value).partition(".")
        if not number.is_finite() or not whole.lstrip("-").isdigit():
            return str(value)
        return f"{int(whole):,}" + (f".{fraction}" if fraction else "")
    return str(value)


def explainable(kind: str, ref: str | None) -> bool:
    """A history entry with an explanation: an award, or a rules compensation."""
    return ref is not None and (kind == "award" or ref.startswith(COMPENSATION_PREFIX))


templates = Environment(
    loader=FileSystemLoader(HERE / "templates"),
    autoescape=select_autoescape(["html"]),
    trim_blocks=True,
    lstrip_blocks=True,
)
templates.filters["figure"] = figure
templates.globals.update(
    location_names=LOCATION_NAMES,
    pending_alias=PENDING_ALIAS,
    htmx_config=HTMX_CONFIG,
    prefix=PREFIX,
    event_types=EVENT_TYPES,
    nav=NAV,
    explainable=explainable,
    shown=shown,
)


def render(
    request: Request,
    template: str,
    status: int = 200,
    headers: Mapping[str, str] | None = None,
    **context: Any,
) -> HTMLResponse:
    html = templates.get_template(template).render(request=request, **context)
    return HTMLResponse(html, status, headers={"Content-Security-Policy": CSP, **(headers or {})})


def is_htmx(request: Request) -> bool:
    return request.headers.get("hx-request") == "true"
