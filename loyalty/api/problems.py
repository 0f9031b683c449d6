"""RFC 9457 problem+json responses, produced in one exception handler."""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Awaitable, Callable, Iterable, MutableMapping, Sequence
from typing import Any

import eventsourcing.persistence as es
import psycopg
import sqlalchemy as sa
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from loyalty.adapters.db import DatabaseUnavailable, database_busy
from loyalty.domain.errors import DomainError, InvalidRules
from loyalty.observability import request_id_var

log = logging.getLogger(__name__)

# HTTP status of each domain error code (anything not listed is a 409 conflict).
DOMAIN_STATUS = {
    "member_not_found": 404,
    "order_not_found": 404,
    "invalid_amount": 422,
    "invalid_rules": 422,
    "award_not_found": 404,
    "period_not_retained": 422,
}

PROBLEM_JSON = "application/problem+json"

_STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "rate_limited",
    500: "internal_error",
    503: "service_unavailable",
}
_TITLES = {
    400: "Bad request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not found",
    405: "Method not allowed",
    409: "Conflict",
    413: "Payload too large",
    415: "Unsupported media type",
    422: "Unprocessable content",
    429: "Too many requests",
    500: "Internal server error",
    503: "Service unavailable",
}


class ApiProblem(Exception):
    """Raise to answer with a problem+json body."""

    def __init__(
        self,
        status: int,
        code: str | None = None,
        detail: str | None = None,
        *,
        errors: Sequence[dict[str, str]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail or code)
        self.status = status
        self.code = code or _STATUS_CODES.get(status, "error")
        self.detail = detail
        self.errors = errors
        self.headers = headers


def problem_response(problem: ApiProblem) -> Response:
    body: dict[str, Any] = {
        "type": "about:blank",
        "title": _TITLES.get(problem.status, "Error"),
        "status": problem.status,
        "code": problem.code,
    }
    if problem.detail:
        body["detail"] = problem.detail
    if problem.errors is not None:
        body["errors"] = list(problem.errors)
    return JSONResponse(body, problem.status, headers=problem.headers, media_type=PROBLEM_JSON)


def format_loc(loc: Iterable[int | str]) -> str:
    """('events', 3, 'occurred_at') -> 'events[3].occurred_at'."""
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text


# What each pattern of the API's schemas asks for, in words (a message never shows the
# regular expression itself).
PATTERN_WORDS: dict[str, str] = {
    r"^[^\x00-\x1f\x7f/]+$": "must not contain control characters or '/'",
    r"^[^\x00-\x1f\x7f]+$": "must not contain control characters",
    r"^[a-z0-9_.-]{1,64}$": (
        "must be 1 to 64 characters, each a lower-case letter a-z, a digit, '_', '.' or '-'"
    ),
    r"^\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})$": (
        "must be an RFC 3339 timestamp with an offset, e.g. 2026-11-26T10:00:00Z"
    ),
    r"^[0-9]{4}-(0[1-9]|1[0-2])$": "must be a month, YYYY-MM (e.g. 2026-11)",
}


def malformed_json(errors: Iterable[Any]) -> ApiProblem:
    """400 ``malformed_json`` from pydantic's ``json_invalid`` error, saying what the
    parser met and at which line and column."""
    where = next(
        (str(e.get("ctx", {}).get("error", "")) for e in errors if e["type"] == "json_invalid"),
        "",
    )
    detail = f"the body is not valid JSON: {where}" if where else "the body is not valid JSON"
    return ApiProblem(400, "malformed_json", detail)


def validation_errors(errors: Iterable[Any]) -> list[dict[str, str]]:
    """Pydantic errors as {loc, msg}; the offending input is never echoed back, and a
    pattern is said in words."""
    out = []
    for err in errors:
        loc = [p for p in err.get("loc", ()) if p != "body"]
        msg = str(err.get("msg", "invalid"))
        if err.get("type") == "string_pattern_mismatch":
            pattern = str(err.get("ctx", {}).get("pattern", ""))
            msg = PATTERN_WORDS.get(pattern, "is not in the form this field takes")
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        out.append({"loc": format_loc(loc) or "body", "msg": msg})
    return out


# The database is gone or going: through SQLAlchemy, the event store, or psycopg itself
# (COPY runs on the driver's connection; its errors arrive unwrapped).
_UNAVAILABLE = (
    DatabaseUnavailable,
    sa.exc.OperationalError,
    sa.exc.InterfaceError,
    es.OperationalError,
    es.InterfaceError,
    psycopg.OperationalError,
    psycopg.InterfaceError,
)


def _read_only(exc: BaseException) -> bool:
    """A write refused because the database is read-only (PostgreSQL's
    ``default_transaction_read_only``, a hot standby; SQLite's read-only file), however
    it is wrapped."""
    seen: BaseException | None = exc
    for _ in range(4):
        if seen is None:
            return False
        if isinstance(seen, psycopg.errors.ReadOnlySqlTransaction):
            return True
        if isinstance(seen, sqlite3.OperationalError) and "readonly" in str(seen):
            return True
        orig = getattr(seen, "orig", None)
        seen = orig if isinstance(orig, BaseException) else seen.__cause__
    return False


def to_problem(exc: Exception) -> ApiProblem:
    """Map every error we know to a problem; anything else is a bug and re-raised."""
    if isinstance(exc, ApiProblem):
        return exc
    if isinstance(exc, InvalidRules):
        return ApiProblem(
            422,
            exc.code,
            exc.message,
            errors=[{"loc": loc or "body", "msg": msg} for loc, msg in exc.problems],
        )
    if isinstance(exc, DomainError):
        return ApiProblem(DOMAIN_STATUS.get(exc.code, 409), exc.code, exc.message)
    if isinstance(exc, RequestValidationError):
        return ApiProblem(422, "validation_error", errors=validation_errors(exc.errors()))
    if isinstance(exc, StarletteHTTPException):
        return ApiProblem(exc.status_code, detail=str(exc.detail), headers=dict(exc.headers or {}))
    if _read_only(exc):
        return ApiProblem(
            503,
            "database_read_only",
            "the database refuses writes; retry later",
            headers={"Retry-After": "5"},
        )
    if isinstance(exc, _UNAVAILABLE):
        return ApiProblem(
            503,
            "database_unavailable",
            "the database is unavailable; retry later",
            headers={"Retry-After": "1"},
        )
    if isinstance(exc, es.IntegrityError):  # optimistic-concurrency retries ran out
        return ApiProblem(
            503, "contention", "the account is busy; retry later", headers={"Retry-After": "1"}
        )
    if isinstance(exc, sa.exc.TimeoutError):
        return ApiProblem(
            503,
            "database_busy",
            "no database connection was free in time; retry later",
            headers={"Retry-After": "1"},
        )
    raise exc


Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class UnhandledErrors:
    """Innermost middleware: an error no handler answered becomes a problem response,
    logged here while the request id is still known. The database being busy answers
    503 with Retry-After (logged in one line); anything else is a bug: 500, logged with
    its traceback and the request id (also in the response's ``x-request-id``)."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking)
        except Exception as exc:
            request_id = request_id_var.get()
            where = f"{scope.get('method')} {scope.get('path')}"
            if started:  # too late for another answer: log it, let the server close
                log.exception(
                    "error after the response started (%s, request_id=%s)", where, request_id
                )
                raise
            if database_busy(exc):
                log.warning(
                    "database busy in %s (request_id=%s): %s: %s",
                    where,
                    request_id,
                    type(exc).__name__,
                    (str(exc).splitlines() or [""])[0],
                )
                problem = ApiProblem(
                    503,
                    "database_busy",
                    "the database is busy; retry later",
                    headers={"Retry-After": "1"},
                )
            else:
                log.exception("unhandled error in %s (request_id=%s)", where, request_id)
                problem = ApiProblem(
                    500,
                    "internal_error",
                    f"an unexpected error; quote request id {request_id} when reporting it",
                )
            await problem_response(problem)(scope, receive, send)


def install(app: FastAPI, extra: Sequence[type[Exception]] = ()) -> None:
    async def handle(_request: Request, exc: Exception) -> Response:
        return problem_response(to_problem(exc))

    # added first, so innermost of the middlewares: inside the request id's
    app.add_middleware(UnhandledErrors)

    for exc_type in (
        ApiProblem,
        DomainError,
        RequestValidationError,
        StarletteHTTPException,
        DatabaseUnavailable,
        sa.exc.OperationalError,
        sa.exc.InterfaceError,
        sa.exc.TimeoutError,
        es.OperationalError,
        es.InterfaceError,
        es.IntegrityError,
        es.InternalError,  # read-only database (anything else: re-raised, a 500)
        sa.exc.InternalError,
        psycopg.Error,
        *extra,
    ):
        app.add_exception_handler(exc_type, handle)


# ------------------------------------------------------------------ OpenAPI document

PROBLEM_REF = "#/components/schemas/Problem"
_NO_DATABASE = {"/healthz", "/metrics"}  # answer without touching the database
_COMMON = {
    400: "malformed request (e.g. not JSON)",
    401: "missing or invalid API key",
    403: "the key's role may not do this",
    413: "request body too large",
    415: "not application/json, or a compressed body",
    422: "invalid parameters or body",
    503: "database unavailable or busy; retry after Retry-After seconds",
}
_RETRY_AFTER = {
    "Retry-After": {"description": "seconds to wait", "schema": {"type": "integer"}},
}


def _problem_response(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {PROBLEM_JSON: {"schema": {"$ref": PROBLEM_REF}}},
    }


def document_problems(schema: dict[str, Any]) -> None:
    """Make an OpenAPI document say what :func:`install`'s handler answers: every error
    is ``application/problem+json`` with the ``Problem`` schema (never FastAPI's
    ``HTTPValidationError``), secured operations may answer 401/403, operations with a
    body 400/413/415/422, with parameters 422, and every one that reaches the database
    503. Routes keep their own, more precise descriptions."""
    for path, operations in schema.get("paths", {}).items():
        for operation in operations.values():
            responses: dict[str, Any] = operation.setdefault("responses", {})
            wanted: set[int] = set()
            if operation.get("security"):
                wanted |= {401, 403}
            if "requestBody" in operation:
                wanted |= {400, 413, 415, 422}
            if operation.get("parameters"):
                wanted.add(422)
            if path not in _NO_DATABASE:
                wanted.add(503)
            for code in sorted(wanted):
                responses.setdefault(str(code), _problem_response(_COMMON[code]))
            for status, response in responses.items():
                if status[:1] in ("4", "5"):
                    response["content"] = {PROBLEM_JSON: {"schema": {"$ref": PROBLEM_REF}}}
                    if status in ("429", "503"):
                        response.setdefault("headers", _RETRY_AFTER)
    components = schema.get("components", {}).get("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):
        components.pop(unused, None)
