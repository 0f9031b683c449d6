"""API keys: list, create (warning of a namesake), revoke (after a confirmation)."""

from __future__ import annotations

import re

from fastapi import APIRouter, Request, Response
from fastapi.responses import RedirectResponse
from starlette.concurrency import run_in_threadpool

from loyalty.adapters.keys import NAME_PATTERN
from loyalty.api.deps import ContainerDep
from loyalty.application.access import Role
from loyalty.console.auth import SessionDep
from loyalty.console.forms import FormDep, confirmation, confirmed
from loyalty.console.problems import ConsoleProblem
from loyalty.console.rendering import PREFIX, render

router = APIRouter()

KEY_ID = re.compile(r"^[0-9a-f]{16}$")


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
