"""The operator console: server-rendered pages under ``/console`` (Jinja2 templates, a
sprinkle of vendored htmx), calling the same use cases as the JSON API. This module
assembles the pages (``pages/``, one module per page or page group) into one router and
installs it with its error answers.

Security, in the order a request meets it:

- a session is server-side (``console_sessions``): the browser holds a random id in a
  cookie (``HttpOnly; SameSite=Strict; Path=/console``, ``Secure`` over HTTPS, as
  uvicorn sees the scheme, forwarded headers included); every request re-reads it with
  its key, which must still be unrevoked and an operator key (``auth.py``);
- every POST carries the session's CSRF token (a hidden field, or the ``X-CSRF-Token``
  header htmx sends from ``hx-headers``), compared in constant time; the sign-in form
  carries a pre-session token (double submit) (``forms.py``);
- every page has a Content-Security-Policy without ``unsafe-inline`` or ``unsafe-eval``:
  scripts and styles only from this origin (htmx is configured through a ``<meta>``)
  (``rendering.py``).

Pages are one template and one route each; fragments (``_*.html``) answer htmx requests.
Nothing is logged with a user id or a key (the access log is off; errors are rendered).
"""

from __future__ import annotations

from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.responses import RedirectResponse
from starlette.staticfiles import StaticFiles

from loyalty.api.deps import Container
from loyalty.console.pages import (
    dashboard,
    forget,
    keys,
    members,
    reports,
    rules,
    sign_in,
    webhooks,
)
from loyalty.console.pages.dashboard import ConsoleState, Figures, IngestRate, accepted_total
from loyalty.console.problems import ConsoleProblem, SignInRequired
from loyalty.console.rendering import PREFIX, STATIC, is_htmx, render

router = APIRouter(prefix=PREFIX, include_in_schema=False)
for page in (sign_in, dashboard, members, rules, forget, keys, webhooks, reports):
    router.include_router(page.router)  # in this order: the first matching route answers


def install_console(app: FastAPI) -> None:
    """``/console`` (pages), ``/console/static`` (vendored htmx, the stylesheet), and
    the answers to a missing session and to errors (an HTML page, never JSON)."""

    async def sign_in_required(request: Request, _exc: Exception) -> Response:
        target = f"{PREFIX}/sign-in"
        if is_htmx(request):
            return Response(status_code=401, headers={"HX-Redirect": target})
        return RedirectResponse(target, status_code=303)

    async def console_problem(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ConsoleProblem)
        template = "_problem.html" if is_htmx(request) else "error.html"
        return render(request, template, exc.status, problem=exc, session=None)

    app.add_exception_handler(SignInRequired, sign_in_required)
    app.add_exception_handler(ConsoleProblem, console_problem)
    container: Container = app.state.container
    app.state.console = ConsoleState(
        IngestRate(lambda: accepted_total(container)),
        Figures(container.settings.console_figures_seconds),
    )

    async def console_root() -> Response:
        return RedirectResponse(f"{PREFIX}/", status_code=308)

    app.add_api_route(PREFIX, console_root, include_in_schema=False)
    app.include_router(router)
    app.mount(f"{PREFIX}/static", StaticFiles(directory=STATIC), name="console-static")
