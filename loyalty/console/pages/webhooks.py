"""Webhook subscriptions: list with their backlog and dead letters, create, delete,
replay the dead letters."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import RedirectResponse
from starlette.concurrency import run_in_threadpool

from loyalty.adapters.console_sessions import ConsoleSession
from loyalty.api.deps import Container, ContainerDep
from loyalty.console.auth import SessionDep
from loyalty.console.forms import HEX32, FormDep
from loyalty.console.problems import ConsoleProblem
from loyalty.console.rendering import PREFIX, render

router = APIRouter()


def webhooks_context(container: Container) -> dict[str, Any]:
    admin = container.webhooks
    assert admin is not None
    return {
        "subscriptions": admin.subscriptions(),
        "backlog": admin.backlog(),
        "dead_letters": admin.dead_letters(),
    }


async def webhooks_answer(
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
    context = await run_in_threadpool(webhooks_context, container)
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
    return await webhooks_answer(request, container, session)


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
    return await webhooks_answer(request, container, session, status, created=created, error=error)


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
    return await webhooks_answer(request, container, session, replayed=replayed)
