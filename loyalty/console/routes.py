"""The operator console: server-rendered pages under ``/console`` (Jinja2 templates, a
sprinkle of vendored htmx), calling the same use cases as the JSON API.

Security, in the order a request meets it:

- a session is server-side (``console_sessions``): the browser holds a random id in a
  cookie (``HttpOnly; SameSite=Strict; Path=/console``, ``Secure`` over HTTPS, as
  uvicorn sees the scheme, forwarded headers included); every request re-reads it with
  its key, which must still be unrevoked and an operator key;
- every POST carries the session's CSRF token (a hidden field, or the ``X-CSRF-Token``
  header htmx sends from ``hx-headers``), compared in constant time; the sign-in form
  carries a pre-session token (double submit);
- every page has a Content-Security-Policy without ``unsafe-inline`` or ``unsafe-eval``:
  scripts and styles only from this origin (htmx is configured through a ``<meta>``).

Pages are one template and one route each; fragments (``_*.html``) answer htmx requests.
Nothing is logged with a user id or a key (the access log is off; errors are rendered).
"""

from __future__ import annotations

import csv
import hmac
import io
import json
import re
import secrets
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import date, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, TypeVar
from urllib.parse import parse_qs, urlencode

from fastapi import APIRouter, Depends, FastAPI, Query, Request, Response
from fastapi import Path as PathParam
from fastapi.responses import HTMLResponse, RedirectResponse
from jinja2 import Environment, FileSystemLoader, select_autoescape
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.staticfiles import StaticFiles

from loyalty.adapters.console_sessions import ConsoleSession, ConsoleSessions
from loyalty.adapters.erasure_store import LOCATION_NAMES
from loyalty.adapters.keys import NAME_PATTERN
from loyalty.adapters.storage import storage_report
from loyalty.api.deps import Container, ContainerDep
from loyalty.api.guards import BodyProblem, read_limited_body
from loyalty.api.problems import ApiProblem, to_problem, validation_errors
from loyalty.api.routes.members import member_body
from loyalty.api.routes.operations import pipeline_status
from loyalty.api.schemas import (
    AdjustmentRequest,
    DryRunPeriod,
    RefundRequest,
    ReportRange,
    SpendRequest,
    StoredInt,
    rules_document,
)
from loyalty.application.access import Role
from loyalty.application.commands.rules import parse_rule_set, rule_set_to_wire
from loyalty.application.compensation import COMPENSATION_PREFIX
from loyalty.application.delivery import EVENT_TYPES
from loyalty.application.explain import PENDING_ALIAS
from loyalty.application.reporting import (
    DAY_COLUMNS,
    FIGURE_LABELS,
    TODAY_FIGURES,
    ReportRangeError,
    check_range,
    daily_report,
    today_report,
)
from loyalty.console.locate import line_of
from loyalty.domain.errors import DomainError, InvalidRules
from loyalty.domain.member import Member
from loyalty.domain.rules import RuleSet
from loyalty.domain.user_ids import user_id_problem

HERE = Path(__file__).parent
STATIC = HERE / "static"
PREFIX = "/console"
COOKIE = "loyalty_console"
PRE_COOKIE = "loyalty_console_signin"
"""The sign-in form's double-submit token (no session exists yet)."""
CSRF_HEADER = "x-csrf-token"
HEX32 = re.compile(r"^[0-9a-f]{32}$")
"""A forget request's or a webhook subscription's id."""
KEY_ID = re.compile(r"^[0-9a-f]{16}$")
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

router = APIRouter(prefix=PREFIX, include_in_schema=False)

_templates = Environment(
    loader=FileSystemLoader(HERE / "templates"),
    autoescape=select_autoescape(["html"]),
    trim_blocks=True,
    lstrip_blocks=True,
)


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


_templates.filters["figure"] = figure
_templates.globals["location_names"] = LOCATION_NAMES
NAV: list[tuple[str, str, str]] = [
    ("dashboard", "Dashboard", "/"),
    ("members", "Members", "/members"),
    ("rules", "Rules", "/rules"),
    ("reports", "Reports", "/reports"),
    ("forget", "Forget-me", "/forget"),
    ("keys", "Keys", "/keys"),
    ("webhooks", "Webhooks", "/webhooks"),
]
"""The sections (a new page: a template, a route and a line here)."""
_templates.globals.update(
    pending_alias=PENDING_ALIAS,
    htmx_config=HTMX_CONFIG,
    prefix=PREFIX,
    event_types=EVENT_TYPES,
    nav=NAV,
)


# ----------------------------------------------------------------------------- plumbing


class ConsoleProblem(ApiProblem):
    """An error of a console request: answered with an HTML page (or fragment), not JSON."""


class SignInRequired(Exception):
    """No live session: a page redirects to the sign-in form, htmx is told to go there."""


def _sessions(container: Container) -> ConsoleSessions:
    assert container.console_sessions is not None
    return container.console_sessions


def render(
    request: Request,
    template: str,
    status: int = 200,
    headers: Mapping[str, str] | None = None,
    **context: Any,
) -> HTMLResponse:
    html = _templates.get_template(template).render(request=request, **context)
    return HTMLResponse(html, status, headers={"Content-Security-Policy": CSP, **(headers or {})})


def _is_htmx(request: Request) -> bool:
    return request.headers.get("hx-request") == "true"


def _secure(request: Request) -> bool:
    return request.url.scheme == "https"


async def current_session(request: Request, container: ContainerDep) -> ConsoleSession:
    session_id = request.cookies.get(COOKIE, "")
    found = None
    if session_id:
        found = await run_in_threadpool(_sessions(container).find, session_id, container.clock())
    if found is None:
        raise SignInRequired()
    return found


SessionDep = Annotated[ConsoleSession, Depends(current_session)]


async def read_form(request: Request, container: Container) -> dict[str, str]:
    """The urlencoded body (first value of each field), read counted up to the limit."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    empty = request.headers.get("content-length", "0") == "0"
    if media != "application/x-www-form-urlencoded" and not (media == "" and empty):
        raise ConsoleProblem(415, "unsupported_media_type", "send a form")
    try:
        body = await read_limited_body(
            request.headers,
            request.stream(),
            container.settings.max_request_bytes,
            "body_too_large",
        )
    except BodyProblem as exc:
        raise ConsoleProblem(exc.status, exc.code, exc.detail) from None
    try:
        parsed = parse_qs(body.decode("utf-8"), keep_blank_values=True, max_num_fields=200)
    except (UnicodeDecodeError, ValueError):
        raise ConsoleProblem(400, "bad_form", "the form could not be read") from None
    request.state.form_lists = parsed  # repeated fields (a webhook's event types)
    return {name: values[0] for name, values in parsed.items()}


def _same(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())


async def checked_form(
    request: Request, container: ContainerDep, session: SessionDep
) -> dict[str, str]:
    """The form of a POST, refused with 403 unless it carries the session's CSRF token."""
    form = await read_form(request, container)
    token = request.headers.get(CSRF_HEADER) or form.get("csrf", "")
    if not _same(token, session.csrf_token):
        raise ConsoleProblem(403, "csrf_failed", "the form's CSRF token is missing or wrong")
    return form


FormDep = Annotated[dict[str, str], Depends(checked_form)]


def _problem(exc: Exception) -> ApiProblem:
    """A known error (domain, API, database busy) as a problem; anything else re-raised."""
    return to_problem(exc)


def _message(problem: ApiProblem) -> str:
    return problem.detail or problem.code


def confirmed(form: Mapping[str, str]) -> bool:
    """Whether an irreversible action's form carries the confirmation step's answer."""
    return form.get("confirm") == "yes"


def confirmation(
    request: Request,
    session: ConsoleSession,
    *,
    page: str,
    title: str,
    effects: list[str],
    action: str,
    fields: Mapping[str, str],
    button: str,
    back: str,
) -> HTMLResponse:
    """The confirmation step of an irreversible action (erase, save rules, revoke): what
    will happen, and the same form again with ``confirm=yes``. Nothing is done yet."""
    confirm = {
        "title": title,
        "effects": effects,
        "action": action,
        "fields": dict(fields),
        "button": button,
        "back": back,
    }
    return render(request, "confirm.html", session=session, page=page, confirm=confirm)


# ------------------------------------------------------------------------- sign in / out


@router.get("/sign-in")
async def sign_in_form(request: Request) -> HTMLResponse:
    token = secrets.token_urlsafe(32)
    response = render(request, "sign_in.html", pre_token=token, error=None)
    _set_cookie(response, request, PRE_COOKIE, token, max_age=3600)
    return response


def _set_cookie(response: Response, request: Request, name: str, value: str, max_age: int) -> None:
    response.set_cookie(
        name,
        value,
        max_age=max_age,
        path=PREFIX,
        httponly=True,
        samesite="strict",
        secure=_secure(request),
    )


@router.post("/sign-in")
async def sign_in(request: Request, container: ContainerDep) -> Response:
    form = await read_form(request, container)
    pre = request.cookies.get(PRE_COOKIE, "")
    if not pre or not _same(form.get("csrf", ""), pre):
        raise ConsoleProblem(403, "csrf_failed", "reload the sign-in page and try again")
    principal = await run_in_threadpool(container.keys.verify, form.get("key", "").strip())
    if principal is None or principal.role is not Role.OPERATOR:
        token = secrets.token_urlsafe(32)
        error = (
            "this key is unknown or revoked"
            if principal is None
            else "only operator keys may use the console"
        )
        refused = render(request, "sign_in.html", 403, pre_token=token, error=error)
        _set_cookie(refused, request, PRE_COOKIE, token, max_age=3600)
        return refused
    session_id, session = await run_in_threadpool(
        _sessions(container).open, principal, container.clock()
    )
    response = RedirectResponse(f"{PREFIX}/", status_code=303)
    lifetime = int((session.expires_at - container.clock()).total_seconds())
    _set_cookie(response, request, COOKIE, session_id, max_age=lifetime)
    response.delete_cookie(
        PRE_COOKIE, path=PREFIX, httponly=True, samesite="strict", secure=_secure(request)
    )
    return response


@router.post("/sign-out")
async def sign_out(request: Request, container: ContainerDep, _form: FormDep) -> Response:
    await run_in_threadpool(_sessions(container).close, request.cookies.get(COOKIE, ""))
    response = RedirectResponse(f"{PREFIX}/sign-in", status_code=303)
    response.delete_cookie(
        COOKIE, path=PREFIX, httponly=True, samesite="strict", secure=_secure(request)
    )
    return response


# ----------------------------------------------------------------------------- dashboard


class IngestRate:
    """Events accepted per second by this process's ingest route, over the last minute
    (sampled when the dashboard polls; a replica sees its own share)."""

    WINDOW = 60.0

    def __init__(self, total: Callable[[], float]) -> None:
        self._total = total
        self._samples: deque[tuple[float, float]] = deque()
        self._lock = threading.Lock()

    def rate(self) -> float | None:
        now, total = time.monotonic(), self._total()
        with self._lock:
            self._samples.append((now, total))
            while len(self._samples) > 2 and now - self._samples[1][0] >= self.WINDOW:
                self._samples.popleft()
            first_at, first = self._samples[0]
        if now - first_at < 0.5:
            return None
        return max(0.0, (total - first) / (now - first_at))


def _accepted_total(container: Container) -> float:
    total = 0.0
    for metric in container.metrics.ingest_events.collect():
        for sample in metric.samples:
            if sample.name.endswith("_total") and sample.labels.get("outcome") == "accepted":
                total += sample.value
    return total


class Figures:
    """The dashboard's costly figures (the storage report counts every table), computed
    at most once per ``ttl`` seconds per process however many dashboards poll; the rest
    is live."""

    def __init__(self, ttl: float = 30.0) -> None:
        self.ttl = ttl
        self._value: tuple[float, dict[str, Any]] | None = None
        self._lock = threading.Lock()

    def get(self, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        with self._lock:  # one computation at a time; the others wait for its result
            found = self._value
            if found is None or time.monotonic() - found[0] >= self.ttl:
                found = (time.monotonic(), compute())
                self._value = found
            return found[1]


@dataclass
class ConsoleState:
    """Per app: the ingest-rate sampler and the cached figures of the dashboard."""

    rate: IngestRate
    figures: Figures = field(default_factory=Figures)


def slow_figures(container: Container) -> dict[str, Any]:
    return {
        "figures_at": container.clock(),
        "storage": storage_report(container.db),
    }


def dashboard_data(container: Container, state: ConsoleState) -> dict[str, Any]:
    settings = container.settings
    now = container.clock()
    today = now.replace(hour=0, minute=0, second=0, microsecond=0)
    pipeline = pipeline_status(container)
    admin = container.webhooks
    subscriptions = admin.subscriptions() if admin else []
    backlog = admin.backlog() if admin else {}
    dead_letters = admin.dead_letter_count() if admin else 0
    lag = pipeline.oldest_pending_age_s or 0.0
    assert container.rollups is not None
    # today's figures are the report's (one definition, one source, not cached: a few
    # rollup rows): the dashboard shows what GET /v1/reports/daily answers for today
    report = today_report(container.rollups, today.date())
    alerts = []
    if lag > settings.console_alert_lag_seconds:
        alerts.append(
            f"pipeline lag {lag:.0f} s is over {settings.console_alert_lag_seconds:.0f} s"
        )
    if dead_letters >= settings.console_alert_dead_letters:
        alerts.append(f"{dead_letters} webhook dead letters wait for a replay")
    if pipeline.quarantined_events:
        alerts.append(f"{pipeline.quarantined_events} account events quarantined (loyalty doctor)")
    return {
        "now": now,
        "ingest_rate": state.rate.rate(),
        "pipeline": pipeline,
        "lag": lag,
        "today": [(f, FIGURE_LABELS[f], report[f]) for f in TODAY_FIGURES],
        "members": report["members_with_balance"],
        **state.figures.get(lambda: slow_figures(container)),
        "horizon": (today - timedelta(days=settings.retention_days)).date(),
        "retention_days": settings.retention_days,
        "figures_seconds": state.figures.ttl,
        "subscriptions": len(subscriptions),
        "backlog": sum(backlog.values()),
        "dead_letters": dead_letters,
        "alerts": alerts,
    }


@router.get("/")
async def dashboard(request: Request, container: ContainerDep, session: SessionDep) -> Response:
    data = await run_in_threadpool(dashboard_data, container, request.app.state.console)
    return render(request, "dashboard.html", session=session, page="dashboard", **data)


@router.get("/dashboard/live")
async def dashboard_live(
    request: Request, container: ContainerDep, session: SessionDep
) -> Response:
    data = await run_in_threadpool(dashboard_data, container, request.app.state.console)
    return render(request, "_dashboard_live.html", session=session, **data)


# ------------------------------------------------------------------------------ members


def member_view(container: Container, user_id: str) -> dict[str, Any]:
    """Everything the member page shows, or ``missing`` when there is no account."""
    try:
        member = container.accounts.get(user_id)
    except DomainError as exc:
        return {"missing": _message(_problem(exc))}
    body = member_body(container, member)
    ladder = container.rules.current().ranks.ranks
    names = [r.name for r in ladder]
    held = names.index(body.rank) if body.rank in names else -1
    progress = None
    if body.rank_points_to_next is not None and held + 1 < len(ladder):
        # as the API counts it (the qualification period's points under rank_qualification)
        target = ladder[held + 1]
        start = ladder[held].min_rank_points if held >= 0 else 0
        have = target.min_rank_points - body.rank_points_to_next
        span = max(1, target.min_rank_points - start)
        progress = {
            "next": target.name,
            "need": body.rank_points_to_next,
            "percent": min(100, max(0, round(100 * (have - start) / span))),
        }
    history = container.read_models.history(user_id, 50)
    return {
        "member": body,
        "progress": progress,
        "history": history,
        "missing": None,
        "refundable": refundable(member),
    }


def _member_context(container: Container, user_id: str) -> dict[str, Any]:
    problem = user_id_problem(user_id) if user_id else None
    if not user_id or problem:
        return {"user_id": user_id, "invalid": problem, "member": None, "missing": None}
    return {"user_id": user_id, "invalid": None, **member_view(container, user_id)}


@router.get("/members")
async def members_page(
    request: Request,
    container: ContainerDep,
    session: SessionDep,
    user_id: str = "",
) -> Response:
    context = await run_in_threadpool(_member_context, container, user_id.strip())
    return render(
        request,
        "member.html",
        session=session,
        page="members",
        adjustment_id=uuid.uuid4().hex,
        result=None,
        **context,
    )


@router.get("/members/explain")
async def explain_award(
    request: Request,
    container: ContainerDep,
    session: SessionDep,
    user_id: str = "",
    award_id: str = "",
) -> Response:
    """Why an award (or the pending one, ``award_id=pending``) is what it is (#20)."""
    explanations = container.explanations
    assert explanations is not None
    if user_id_problem(user_id) or not award_id or len(award_id) > 200:
        raise ConsoleProblem(404, "award_not_found", "no such award")

    def work() -> dict[str, Any]:
        try:
            return explanations.explain(user_id, award_id)
        except DomainError as exc:
            problem = _problem(exc)
            raise ConsoleProblem(problem.status, problem.code, _message(problem)) from None

    explanation = await run_in_threadpool(work)
    return render(request, "_explanation.html", session=session, e=explanation)


def explainable(kind: str, ref: str | None) -> bool:
    """A history entry with an explanation: an award, or a rules compensation."""
    return ref is not None and (kind == "award" or ref.startswith(COMPENSATION_PREFIX))


_templates.globals["explainable"] = explainable


M = TypeVar("M", bound=BaseModel)


def form_command(model: type[M], form: Mapping[str, str]) -> M:
    """The form as the JSON API's command ``model`` (``loyalty.api.schemas``: the same
    fields, bounds and patterns; a form's values are text, read as the model's types),
    or a 422 naming each field it refuses. Surrounding blanks are trimmed."""
    fields = {}
    for name, info in model.model_fields.items():
        key = info.alias or name
        if form.get(key, "").strip():  # a blank field is a missing one
            fields[key] = form[key].strip()
    try:
        return model.model_validate_strings(fields)
    except ValidationError as exc:
        errors = validation_errors(exc.errors(include_input=False, include_url=False))
        detail = "; ".join(f"{e['loc'].replace('_', ' ')}: {e['msg']}" for e in errors)
        raise ConsoleProblem(422, "validation_error", detail, errors=errors) from None


def _member_action(
    container: Container, session: ConsoleSession, action: str, form: Mapping[str, str]
) -> tuple[str, str]:
    """Run ``action`` on the member named by the form; (message, member user id)."""
    user_id = form.get("user_id", "")
    problem = user_id_problem(user_id)
    if problem:
        raise ConsoleProblem(422, "validation_error", f"user id: {problem}")
    source = session.principal.name
    spending = container.spending
    if action == "spend":
        spend = form_command(SpendRequest, form)
        result = spending.spend(user_id, spend.order_id, spend.amount, source)
        return f"spent {result.amount} on order {result.order_id}", user_id
    if action == "refund":
        refund = form_command(RefundRequest, form)
        owner = refund.source or order_source(container, user_id, refund.order_id, source)
        by = None if owner == source else source
        result = spending.refund(user_id, refund.order_id, owner, by)
        whose = "" if by is None else f" (placed by {owner}; refunded by {by})"
        return f"refunded {result.amount} of order {result.order_id}{whose}", user_id
    adjust = form_command(AdjustmentRequest, form)
    ranks = container.rules.current().ranks
    spending.adjust(
        user_id,
        adjust.adjustment_id,
        adjust.currency,
        adjust.rank_points,
        adjust.reason,
        ranks,
        source,
    )
    currency, points = adjust.currency, adjust.rank_points
    return f"adjusted by {currency:+d} currency and {points:+d} rank points", user_id


def order_source(container: Container, user_id: str, order_id: str, own: str) -> str:
    """Whose order ``order_id`` of the member an operator refunds when the form names no
    source: the operator's own if it has one, else the one source that has it (an order
    id two shops used must be named: a 409 listing them)."""
    try:
        sources = container.accounts.get(user_id).order_sources(order_id)
    except DomainError:
        return own  # the refund answers member_not_found
    if own in sources or None in sources or not sources:
        return own  # a legacy order answers every source; none: order_not_found
    if len(sources) > 1:
        listed = ", ".join(str(s) for s in sources)
        raise ConsoleProblem(
            409,
            "ambiguous_order",
            f"order {order_id} was placed by several sources ({listed}): choose one",
        )
    return str(sources[0])


def refundable(member: Member) -> dict[str, list[str]]:
    """Per order id, the sources of the member's unrefunded orders (the history's
    Refund buttons)."""
    found: dict[str, list[str]] = {}
    for key in member.orders:
        if key not in member.refunded_orders:
            source, order_id = json.loads(key)
            found.setdefault(order_id, []).append("" if source is None else source)
    return found


@router.post("/members/{action}")
async def member_action(
    action: str,
    request: Request,
    container: ContainerDep,
    session: SessionDep,
    form: FormDep,
) -> Response:
    if action not in ("spend", "refund", "adjust"):
        raise ConsoleProblem(404, "not_found")
    user_id = form.get("user_id", "")

    def work() -> tuple[int, dict[str, Any]]:
        try:
            message, _ = _member_action(container, session, action, form)
            status, outcome = 200, {"ok": True, "message": message}
        except (ApiProblem, DomainError) as exc:
            problem = _problem(exc)
            status, outcome = problem.status, {"ok": False, "message": _message(problem)}
        return status, {**outcome, **_member_context(container, user_id)}

    status, context = await run_in_threadpool(work)
    context.update(action=action, adjustment_id=uuid.uuid4().hex)
    if _is_htmx(request):
        return render(request, "_member_result.html", status, session=session, **context)
    result = {"action": action, "ok": context["ok"], "message": context["message"]}
    context.update(result=result)
    return render(request, "member.html", status, session=session, page="members", **context)


# -------------------------------------------------------------------------------- rules


DRY_RUN_DAYS = 7
"""The dry run's default period: the last 7 UTC days, today included (within retention)."""


def _rules_context(container: Container, text: str | None = None) -> dict[str, Any]:
    current = container.rules.current()
    today = container.clock().date()
    days = min(DRY_RUN_DAYS, container.settings.retention_days)
    return {
        "current": current,
        "text": text if text is not None else json.dumps(rule_set_to_wire(current), indent=2),
        "versions": container.rules.versions(),
        "dry_from": today - timedelta(days=days - 1),
        "dry_through": today,
        "dry_run": None,
    }


@router.get("/rules")
async def rules_page(request: Request, container: ContainerDep, session: SessionDep) -> Response:
    context = await run_in_threadpool(_rules_context, container)
    return render(
        request, "rules.html", session=session, page="rules", errors=[], saved=None, **context
    )


@router.get("/rules/versions/{version}")
async def rules_version(
    version: Annotated[StoredInt, PathParam()],
    request: Request,
    container: ContainerDep,
    session: SessionDep,
) -> Response:
    found = await run_in_threadpool(container.rules.version, version)
    if found is None:
        raise ConsoleProblem(404, "not_found", "no such rules version")
    text = json.dumps(rule_set_to_wire(found[0]), indent=2)
    return render(
        request, "rules_version.html", session=session, page="rules", version=version, text=text
    )


def parse_rules_text(text: str) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """The editor's JSON as an object, read as ``PUT /v1/rules`` reads its body
    (:func:`~loyalty.api.schemas.rules_document`), or the errors that stop it (a syntax
    error with its line and column)."""
    try:
        return rules_document(text.encode("utf-8", "surrogatepass")), []
    except BodyProblem as exc:
        cause = exc.__cause__
        if isinstance(cause, json.JSONDecodeError):
            where = f"line {cause.lineno}, column {cause.colno}"
            return None, [{"loc": where, "msg": cause.msg, "line": cause.lineno}]
        line = 1 if exc.code == "invalid_rules" else None
        return None, [{"loc": "(document)", "msg": exc.detail, "line": line}]


def located(text: str, exc: InvalidRules) -> list[dict[str, Any]]:
    """The problems of a rules document, each with the line of the editor it is about."""
    return [
        {"loc": loc or "(document)", "msg": msg, "line": line_of(text, loc)}
        for loc, msg in exc.problems
    ]


@router.post("/rules")
async def save_rules(
    request: Request, container: ContainerDep, session: SessionDep, form: FormDep
) -> Response:
    text = form.get("rules", "")
    sure = confirmed(form)

    def work() -> tuple[int, list[dict[str, Any]], int | None, list[str]]:
        wire, errors = parse_rules_text(text)
        if wire is None:
            return 422, errors, None, []
        try:
            if not sure:  # judged as the save would, then shown before anything is stored
                return 200, [], None, rules_changes(container, parse_rule_set(wire, 0))
            saved = container.rules.put(wire, container.clock())
        except InvalidRules as exc:
            return 422, located(text, exc), None, []
        return 200, [], saved.version, []

    status, errors, saved, changes = await run_in_threadpool(work)
    if changes:
        return confirmation(
            request,
            session,
            page="rules",
            title="save the rules as a new version",
            effects=changes,
            action=f"{PREFIX}/rules",
            fields={"rules": text},
            button="Save the new version",
            back=f"{PREFIX}/rules",
        )
    context = await run_in_threadpool(_rules_context, container, None if saved else text)
    return render(
        request,
        "rules.html",
        status,
        session=session,
        page="rules",
        errors=errors,
        saved=saved,
        **context,
    )


def rules_changes(container: Container, candidate: RuleSet) -> list[str]:
    """What saving ``candidate`` does, for the confirmation step: its version, and each
    part that differs from the current rules (the dry run shows the effect on members)."""
    current = container.rules.current()
    now, new = rule_set_to_wire(current), rule_set_to_wire(candidate)
    effects = [
        f"the rules become version {current.version + 1} (now {current.version}); awards "
        "from now on are weighed by them (past awards stay as they are)"
    ]
    old_rules = {r["event_type"]: r for r in now.get("rules", [])}
    new_rules = {r["event_type"]: r for r in new.get("rules", [])}
    for label, names in (
        ("event types added", sorted(new_rules.keys() - old_rules.keys())),
        ("event types removed (no longer earn)", sorted(old_rules.keys() - new_rules.keys())),
        (
            "event types reweighted",
            sorted(t for t in new_rules.keys() & old_rules.keys() if new_rules[t] != old_rules[t]),
        ),
    ):
        if names:
            effects.append(f"{label}: {', '.join(names)}")
    for part, label in (
        ("ranks", "the rank ladder changes (members may move rank)"),
        ("currency_expiry", "currency expiry changes"),
        ("rank_qualification", "rank qualification changes"),
    ):
        if now.get(part) != new.get(part):
            effects.append(f"{label}: {json.dumps(new.get(part))}")
    if len(effects) == 1:
        effects.append("nothing differs from the current rules but the version number")
    return effects


def dry_run_of(container: Container, form: Mapping[str, str]) -> tuple[int, dict[str, Any]]:
    """The dry run (#20) of the editor's rules over ``from`` .. ``through`` (UTC days,
    both included): (status, {result} or {errors}). Reads only; nothing is saved."""
    runner = container.dry_run
    assert runner is not None
    text = form.get("rules", "")
    wire, errors = parse_rules_text(text)
    if wire is None:
        return 422, {"errors": errors}
    try:
        period = form_command(DryRunPeriod, form)
    except ConsoleProblem as exc:
        errors = [{**e, "line": None} for e in exc.errors or []]
        return 422, {"errors": errors}
    try:
        candidate = parse_rule_set(wire, 0)
        result = runner.run(candidate, period.from_, period.through)
    except InvalidRules as exc:
        return 422, {"errors": located(text, exc)}
    except DomainError as exc:  # the period: empty, outside retention, in the future
        problem = _problem(exc)
        return problem.status, {
            "errors": [{"loc": "period", "msg": _message(problem), "line": None}]
        }
    return 200, {"result": result}


@router.post("/rules/dry-run")
async def rules_dry_run(
    request: Request, container: ContainerDep, session: SessionDep, form: FormDep
) -> Response:
    status, dry_run = await run_in_threadpool(dry_run_of, container, form)
    if _is_htmx(request):
        return render(request, "_dry_run.html", status, session=session, dry_run=dry_run)
    context = await run_in_threadpool(_rules_context, container, form.get("rules", ""))
    context["dry_run"] = dry_run
    with suppress(ConsoleProblem):
        period = form_command(DryRunPeriod, form)
        context["dry_from"], context["dry_through"] = period.from_, period.through
    return render(
        request,
        "rules.html",
        status,
        session=session,
        page="rules",
        errors=[],
        saved=None,
        **context,
    )


# ---------------------------------------------------------------------------- forget-me


@router.get("/forget")
async def forget_page(request: Request, container: ContainerDep, session: SessionDep) -> Response:
    recent = await run_in_threadpool(container.forget.recent)
    return render(request, "forget.html", session=session, page="forget", error=None, recent=recent)


@router.post("/forget")
async def forget_request(
    request: Request, container: ContainerDep, session: SessionDep, form: FormDep
) -> Response:
    user_id = form.get("user_id", "")
    problem = user_id_problem(user_id)
    if problem:
        recent = await run_in_threadpool(container.forget.recent)
        return render(
            request,
            "forget.html",
            422,
            session=session,
            page="forget",
            error=f"user id: {problem}",
            recent=recent,
        )
    if not confirmed(form):
        effects = await run_in_threadpool(forget_effects, container, user_id)
        return confirmation(
            request,
            session,
            page="forget",
            title=f"erase member {user_id}",
            effects=effects,
            action=f"{PREFIX}/forget",
            fields={"user_id": user_id},
            button="Erase this member",
            back=f"{PREFIX}/forget",
        )
    created = await run_in_threadpool(container.forget.request, user_id)
    container.metrics.forget_requests.labels(status="requested").inc()
    return RedirectResponse(f"{PREFIX}/forget/{created.request_id}", status_code=303)


def forget_effects(container: Container, user_id: str) -> list[str]:
    """What erasing ``user_id`` does, for the confirmation step."""
    try:
        member = container.accounts.get(user_id)
        account = (
            f"the account: {member.currency} currency, {member.rank_points} rank points and "
            "its whole history, gone for good (the balance is not paid out)"
        )
    except DomainError:
        account = "no account is recorded under this user id"
    return [
        account,
        "every ingress event, pending earning, statement line, explanation and webhook "
        "delivery of this user id is deleted",
        "the receipt keeps counts and times, never the user id; the erasure cannot be reversed",
    ]


@router.get("/forget/lookup")
async def forget_lookup(_session: SessionDep, request_id: str = "") -> Response:
    request_id = request_id.strip().lower()
    if not HEX32.match(request_id):
        raise ConsoleProblem(404, "forget_request_not_found", "no such forget request")
    return RedirectResponse(f"{PREFIX}/forget/{request_id}", status_code=303)


@router.get("/forget/{request_id}")
async def forget_receipt(
    request_id: str, request: Request, container: ContainerDep, session: SessionDep
) -> Response:
    found = None
    if HEX32.match(request_id):
        found = await run_in_threadpool(container.forget.status, request_id)
    if found is None:
        raise ConsoleProblem(404, "forget_request_not_found", "no such forget request")
    template = "_forget_receipt.html" if _is_htmx(request) else "forget_receipt.html"
    return render(request, template, session=session, page="forget", receipt=found)


# --------------------------------------------------------------------------------- keys


@router.get("/keys")
async def keys_page(request: Request, container: ContainerDep, session: SessionDep) -> Response:
    keys = await run_in_threadpool(container.keys.list)
    return render(
        request,
        "keys.html",
        session=session,
        page="keys",
        keys=keys,
        created=None,
        error=None,
        warning=None,
    )


@router.post("/keys")
async def create_key(
    request: Request, container: ContainerDep, session: SessionDep, form: FormDep
) -> Response:
    name = form.get("name", "").strip()
    created = error = warning = None
    status = 200
    try:
        role = Role(form.get("role", ""))
        if not NAME_PATTERN.match(name):
            raise ValueError("name: 1-128 characters of A-Z a-z 0-9 _ . -")
        namesakes = await run_in_threadpool(container.keys.namesakes, name)
        created = await run_in_threadpool(container.keys.create, role, name)
    except ValueError as exc:
        error, status = str(exc), 422
    else:
        if namesakes:
            ids = ", ".join(f"{k.key_id} ({k.role.value})" for k in namesakes)
            warning = (
                f"another active key is named {name}: {ids}. If this one replaces it, "
                "revoke the old one once the new one is in use."
            )
    keys = await run_in_threadpool(container.keys.list)
    return render(
        request,
        "keys.html",
        status,
        session=session,
        page="keys",
        keys=keys,
        created=created,
        error=error,
        warning=warning,
    )


@router.post("/keys/{key_id}/revoke")
async def revoke_key(
    key_id: str, request: Request, container: ContainerDep, session: SessionDep, _form: FormDep
) -> Response:
    if not KEY_ID.match(key_id):
        raise ConsoleProblem(404, "not_found", "no such key")
    if not confirmed(_form):
        keys = await run_in_threadpool(container.keys.list)
        found = next((k for k in keys if k.key_id == key_id and not k.revoked_at), None)
        if found is None:
            raise ConsoleProblem(404, "not_found", "no such active key")
        cache = container.settings.auth_cache_seconds
        effects = [
            f"key {key_id} ({found.name}, {found.role.value}) stops working within "
            f"{cache:g} s: whoever holds it gets 401 from then on; a revoked key cannot "
            "be restored (create a new one)"
        ]
        if key_id == session.principal.key_id:
            effects.append("this is the key you signed in with: this console session ends with it")
        return confirmation(
            request,
            session,
            page="keys",
            title=f"revoke key {key_id}",
            effects=effects,
            action=f"{PREFIX}/keys/{key_id}/revoke",
            fields={},
            button="Revoke this key",
            back=f"{PREFIX}/keys",
        )
    await run_in_threadpool(container.keys.revoke, key_id)
    return RedirectResponse(f"{PREFIX}/keys", status_code=303)


# ----------------------------------------------------------------------------- webhooks


def _webhooks_context(container: Container) -> dict[str, Any]:
    admin = container.webhooks
    assert admin is not None
    return {
        "subscriptions": admin.subscriptions(),
        "backlog": admin.backlog(),
        "dead_letters": admin.dead_letters(),
    }


async def _webhooks_page(
    request: Request,
    container: Container,
    session: ConsoleSession,
    status: int = 200,
    *,
    created: object = None,
    error: str | None = None,
    replayed: tuple[int, int] | None = None,
) -> Response:
    """The webhooks page, with the outcome of the action that led to it."""
    context = await run_in_threadpool(_webhooks_context, container)
    return render(
        request,
        "webhooks.html",
        status,
        session=session,
        page="webhooks",
        created=created,
        error=error,
        replayed=replayed,
        **context,
    )


@router.get("/webhooks")
async def webhooks_page(request: Request, container: ContainerDep, session: SessionDep) -> Response:
    return await _webhooks_page(request, container, session)


@router.post("/webhooks")
async def create_webhook(
    request: Request, container: ContainerDep, session: SessionDep, form: FormDep
) -> Response:
    admin = container.webhooks
    assert admin is not None
    types = [t for t in request.state.form_lists.get("event_type", []) if t]
    created = error = None
    status = 201
    try:
        created = await run_in_threadpool(admin.create, form.get("url", "").strip(), types)
    except ValueError as exc:
        error, status = str(exc), 422
    return await _webhooks_page(request, container, session, status, created=created, error=error)


@router.post("/webhooks/{subscription_id}/delete")
async def delete_webhook(
    subscription_id: str, container: ContainerDep, _session: SessionDep, _form: FormDep
) -> Response:
    admin = container.webhooks
    assert admin is not None
    if not HEX32.match(subscription_id):
        raise ConsoleProblem(404, "webhook_not_found", "no such subscription")
    await run_in_threadpool(admin.delete, subscription_id)
    return RedirectResponse(f"{PREFIX}/webhooks", status_code=303)


@router.post("/webhooks/replay")
async def replay_dead_letters(
    request: Request, container: ContainerDep, session: SessionDep, _form: FormDep
) -> Response:
    admin, factory = container.webhooks, container.webhook_sender
    assert admin is not None and factory is not None

    def work() -> tuple[int, int]:
        sender = factory()
        try:
            return admin.replay(sender)
        finally:
            sender.close()

    replayed = await run_in_threadpool(work)
    return await _webhooks_page(request, container, session, replayed=replayed)


# ------------------------------------------------------------------------------ reports

REPORT_DAYS = 30
"""The range the reports page opens with (the last 30 UTC days)."""
CHART_WIDTH, CHART_HEIGHT = 720, 160
CHARTS: list[tuple[str, str, str]] = [
    ("events", FIGURE_LABELS["events"], "#0a4fa3"),
    ("currency_credited", FIGURE_LABELS["currency_credited"], "#1d6b2f"),
    ("currency_spent", FIGURE_LABELS["currency_spent"], "#a1120d"),
    ("outstanding_currency", FIGURE_LABELS["outstanding_currency"], "#13263f"),
]
REPORT_COLUMNS: tuple[str, ...] = (
    "day",
    *TODAY_FIGURES[:-1],
    "active_members",
    "new_members",
    "outstanding_currency",
)
"""The reports page's table: the dashboard's figures of today, for each day, and more."""
EXPORT_COLUMNS = list(DAY_COLUMNS)


def report_range(first: str, last: str, today: date) -> tuple[date, date]:
    """The page's range: ``from``/``to`` as given (YYYY-MM-DD, bounded days: see
    :class:`~loyalty.api.schemas.ReportRange`), else the last 30 days."""
    given = form_command(ReportRange, {"from": first, "to": last})
    end = given.to or today
    start = given.from_ or end - timedelta(days=REPORT_DAYS - 1)
    try:
        check_range(start, end)
    except ReportRangeError as exc:
        raise ConsoleProblem(422, "invalid_range", str(exc)) from None
    return start, end


def bars(days: list[dict[str, Any]], field: str) -> list[dict[str, Any]]:
    """One bar per day, scaled to the chart (SVG coordinates; server-drawn, no script)."""
    values = [float(d[field]) for d in days]
    top = max([*values, 1.0])
    width = CHART_WIDTH / max(1, len(values))
    return [
        {
            "x": round(i * width + width * 0.1, 2),
            "width": round(width * 0.8, 2),
            "height": round(CHART_HEIGHT * v / top, 2),
            "y": round(CHART_HEIGHT - CHART_HEIGHT * v / top, 2),
            "day": d["day"],
            "value": d[field],
        }
        for i, (d, v) in enumerate(zip(days, values, strict=True))
    ]


def _report(container: Container, start: date, end: date) -> list[dict[str, Any]]:
    assert container.rollups is not None
    return [d.to_wire() for d in daily_report(container.rollups, start, end)]


@router.get("/reports")
async def reports_page(
    request: Request,
    container: ContainerDep,
    session: SessionDep,
    first: Annotated[str, Query(alias="from")] = "",
    last: Annotated[str, Query(alias="to")] = "",
) -> Response:
    start, end = report_range(first, last, container.clock().date())
    days = await run_in_threadpool(_report, container, start, end)
    charts = [
        {
            "field": f,
            "title": t,
            "colour": c,
            "bars": bars(days, f),
            "top": max([0, *(d[f] for d in days)]),
        }
        for f, t, c in CHARTS
    ]
    return render(
        request,
        "reports.html",
        session=session,
        page="reports",
        start=start,
        end=end,
        days=days,
        charts=charts,
        columns=REPORT_COLUMNS,
        labels=FIGURE_LABELS,
        width=CHART_WIDTH,
        height=CHART_HEIGHT,
        export=f"{PREFIX}/reports/export.csv?" + urlencode({"from": start, "to": end}),
    )


@router.get("/reports/export.csv")
async def reports_export(
    container: ContainerDep,
    _session: SessionDep,
    first: Annotated[str, Query(alias="from")] = "",
    last: Annotated[str, Query(alias="to")] = "",
) -> Response:
    start, end = report_range(first, last, container.clock().date())
    days = await run_in_threadpool(_report, container, start, end)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(EXPORT_COLUMNS)
    for d in days:
        writer.writerow([d[c] for c in EXPORT_COLUMNS])
    name = f"loyalty-daily-{start}-{end}.csv"
    return Response(
        out.getvalue(),
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="{name}"'},
    )


# ------------------------------------------------------------------------------ install


def install_console(app: FastAPI) -> None:
    """``/console`` (pages), ``/console/static`` (vendored htmx, the stylesheet), and
    the answers to a missing session and to errors (an HTML page, never JSON)."""

    async def sign_in_required(request: Request, _exc: Exception) -> Response:
        target = f"{PREFIX}/sign-in"
        if _is_htmx(request):
            return Response(status_code=401, headers={"HX-Redirect": target})
        return RedirectResponse(target, status_code=303)

    async def console_problem(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ConsoleProblem)
        template = "_problem.html" if _is_htmx(request) else "error.html"
        return render(request, template, exc.status, problem=exc, session=None)

    app.add_exception_handler(SignInRequired, sign_in_required)
    app.add_exception_handler(ConsoleProblem, console_problem)
    container: Container = app.state.container
    app.state.console = ConsoleState(
        IngestRate(lambda: _accepted_total(container)),
        Figures(container.settings.console_figures_seconds),
    )

    async def console_root() -> Response:
        return RedirectResponse(f"{PREFIX}/", status_code=308)

    app.add_api_route(PREFIX, console_root, include_in_schema=False)
    app.include_router(router)
    app.mount(f"{PREFIX}/static", StaticFiles(directory=STATIC), name="console-static")
