"""Forget-me: request a member's erasure (after a confirmation naming what goes), look
up a request, follow its receipt."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import RedirectResponse
from starlette.concurrency import run_in_threadpool

from loyalty.api.deps import Container, ContainerDep
from loyalty.console.auth import SessionDep
from loyalty.console.forms import HEX32, FormDep, confirmation, confirmed
from loyalty.console.problems import ConsoleProblem
from loyalty.console.rendering import PREFIX, is_htmx, render
from loyalty.domain.errors import DomainError
from loyalty.domain.user_ids import user_id_problem

router = APIRouter()


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
    template = "_forget_receipt.html" if is_htmx(request) else "forget_receipt.html"
    return render(request, template, session=session, page="forget", receipt=found)
