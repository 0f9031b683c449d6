"""Who is signed in: the server-side session behind the cookie (re-read with its key on
every request: unexpired, key unrevoked, role operator), and the cookies' flags."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request, Response
from starlette.concurrency import run_in_threadpool

from loyalty.adapters.console_sessions import ConsoleSession, ConsoleSessions
from loyalty.api.deps import Container, ContainerDep
from loyalty.console.problems import SignInRequired
from loyalty.console.rendering import PREFIX

COOKIE = "loyalty_console"
PRE_COOKIE = "loyalty_console_signin"
"""The sign-in form's double-submit token (no session exists yet)."""


def sessions(container: Container) -> ConsoleSessions:
    assert container.console_sessions is not None
    return container.console_sessions


def secure(request: Request) -> bool:
    return request.url.scheme == "https"


def same(given: str, expected: str) -> bool:
    """Whether two tokens are equal (compared in constant time)."""
    return hmac.compare_digest(given.encode(), expected.encode())


async def current_session(request: Request, container: ContainerDep) -> ConsoleSession:
    session_id = request.cookies.get(COOKIE, "")
    found = None
    if session_id:
        found = await run_in_threadpool(sessions(container).find, session_id, container.clock())
    if found is None:
        raise SignInRequired()
    return found


SessionDep = Annotated[ConsoleSession, Depends(current_session)]


def set_cookie(response: Response, request: Request, name: str, value: str, max_age: int) -> None:
    response.set_cookie(
        name,
        value,
        max_age=max_age,
        path=PREFIX,
        httponly=True,
        samesite="strict",
        secure=secure(request),
    )


def delete_cookie(response: Response, request: Request, name: str) -> None:
    response.delete_cookie(
        name, path=PREFIX, httponly=True, samesite="strict", secure=secure(request)
    )
