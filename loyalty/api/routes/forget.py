"""Forget-me requests (operator): erase a member everywhere, with a receipt."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path
from starlette.concurrency import run_in_threadpool

from loyalty.api.deps import ContainerDep, OperatorKey, json_body, request_body
from loyalty.api.problems import ApiProblem
from loyalty.api.schemas import ForgetAccepted, ForgetReceipt, Problem
from loyalty.application.access import Role
from loyalty.application.commands.forget import ForgetRequestBody
from loyalty.application.erasure import ForgetRequest

router = APIRouter(tags=["forget"])

_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": Problem, "description": "missing or invalid API key"},
    403: {"model": Problem, "description": "needs an operator key"},
}


def receipt(request: ForgetRequest) -> ForgetReceipt:
    return ForgetReceipt(
        request_id=request.request_id,
        status=request.status,
        requested_at=request.requested_at,
        completed_at=request.completed_at,
        erased=request.erased,
    )


@router.post(
    "/v1/forget-requests",
    summary="Ask to forget a member",
    status_code=202,
    response_model=ForgetAccepted,
    responses={
        **_ERRORS,
        400: {"model": Problem, "description": "malformed JSON"},
        413: {"model": Problem, "description": "body too large"},
        415: {"model": Problem, "description": "not application/json, or compressed"},
        422: {"model": Problem, "description": "invalid body, or an object repeats a key"},
    },
    openapi_extra=request_body(ForgetRequestBody),
)
async def post_forget_request(
    _key: OperatorKey,
    body: Annotated[ForgetRequestBody, json_body(ForgetRequestBody, Role.OPERATOR)],
    container: ContainerDep,
) -> ForgetAccepted:
    """Ask for a member to be forgotten; the worker erases every copy and keeps a receipt."""
    request = await run_in_threadpool(container.forget.request, body.user_id)
    container.metrics.forget_requests.labels(status="requested").inc()
    return ForgetAccepted(request_id=request.request_id, status=request.status)


@router.get(
    "/v1/forget-requests/{request_id}",
    summary="Read a forget request's receipt",
    response_model=ForgetReceipt,
    responses={**_ERRORS, 404: {"model": Problem, "description": "no such request"}},
)
async def get_forget_request(
    request_id: Annotated[str, Path(pattern=r"^[0-9a-f]{32}$")],
    _key: OperatorKey,
    container: ContainerDep,
) -> ForgetReceipt:
    """The request's status and receipt (times, rows erased per location; no user id)."""
    found = await run_in_threadpool(container.forget.status, request_id)
    if found is None:
        raise ApiProblem(404, "forget_request_not_found", "no such forget request")
    return receipt(found)
