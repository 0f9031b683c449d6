"""Sign in with an operator key (a double-submit token guards the form), sign out."""

from __future__ import annotations

import secrets

from fastapi import APIRouter, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse
from starlette.concurrency import run_in_threadpool

from loyalty.api.deps import ContainerDep
from loyalty.application.access import Role
from loyalty.console.auth import COOKIE, PRE_COOKIE, delete_cookie, same, sessions, set_cookie
from loyalty.console.forms import FormDep, read_form
from loyalty.console.problems import ConsoleProblem
from loyalty.console.rendering import PREFIX, render

router = APIRouter()


@router.get("/sign-in")
async def sign_in_form(request: Request) -> HTMLResponse:
    token = secrets.token_urlsafe(32)
    response = render(request, "sign_in.html", pre_token=token, error=None)
    set_cookie(response, request, PRE_COOKIE, token, max_age=3600)
    return response


@router.post("/sign-in")
async def sign_in(request: Request, container: ContainerDep) -> Response:
    form = await read_form(request, container)
    pre = request.cookies.get(PRE_COOKIE, "")
    if not pre or not same(form.get("csrf", ""), pre):
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
        set_cookie(refused, request, PRE_COOKIE, token, max_age=3600)
        return refused
    session_id, session = await run_in_threadpool(
        sessions(container).open, principal, container.clock()
    )
    response = RedirectResponse(f"{PREFIX}/", status_code=303)
    lifetime = int((session.expires_at - container.clock()).total_seconds())
    set_cookie(response, request, COOKIE, session_id, max_age=lifetime)
    delete_cookie(response, request, PRE_COOKIE)
    return response


@router.post("/sign-out")
async def sign_out(request: Request, container: ContainerDep, _form: FormDep) -> Response:
    await run_in_threadpool(sessions(container).close, request.cookies.get(COOKIE, ""))
    response = RedirectResponse(f"{PREFIX}/sign-in", status_code=303)
    delete_cookie(response, request, COOKIE)
    return response
