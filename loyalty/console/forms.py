"""A POST's form: read counted up to the limit, checked against the session's CSRF
token, read as the JSON API's command models; and the confirmation step of an
irreversible action."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Annotated, TypeVar
from urllib.parse import parse_qs

from fastapi import Depends, Request
from fastapi.responses import HTMLResponse
from pydantic import BaseModel, ValidationError

from loyalty.adapters.console_sessions import ConsoleSession
from loyalty.api.deps import Container, ContainerDep
from loyalty.api.guards import BodyProblem, read_limited_body
from loyalty.api.problems import validation_errors
from loyalty.application.rule_history import RuleChange
from loyalty.console.auth import SessionDep, same
from loyalty.console.problems import ConsoleProblem
from loyalty.console.rendering import render

CSRF_HEADER = "x-csrf-token"
HEX32 = re.compile(r"^[0-9a-f]{32}$")
"""A forget request's or a webhook subscription's id."""


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


async def checked_form(
    request: Request, container: ContainerDep, session: SessionDep
) -> dict[str, str]:
    """The form of a POST, refused with 403 unless it carries the session's CSRF token."""
    form = await read_form(request, container)
    token = request.headers.get(CSRF_HEADER) or form.get("csrf", "")
    if not same(token, session.csrf_token):
        raise ConsoleProblem(403, "csrf_failed", "the form's CSRF token is missing or wrong")
    return form


FormDep = Annotated[dict[str, str], Depends(checked_form)]

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
    changes: Sequence[RuleChange] = (),
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
        "changes": list(changes),
    }
    return render(request, "confirm.html", session=session, page=page, confirm=confirm)
