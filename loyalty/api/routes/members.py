"""Member accounts: balances, spending, refunds, adjustments, statements, leaderboard."""

from __future__ import annotations

import base64
import binascii
import re
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Path, Query, Response
from pydantic import AfterValidator
from starlette.concurrency import run_in_threadpool

from loyalty.api.deps import Container, ContainerDep, OperatorKey, ShopKey, json_body, request_body
from loyalty.api.problems import ApiProblem
from loyalty.api.schemas import (
    AdjustmentBody,
    ExpiringBody,
    HistoryBody,
    HistoryEntryBody,
    LeaderboardBody,
    LeaderboardEntry,
    MemberBody,
    OrderBody,
    PendingBody,
    Problem,
    RefundBody,
)
from loyalty.application.access import Role
from loyalty.application.accounts import OrderResult
from loyalty.application.accounts.views import AccountView
from loyalty.application.commands.accounts import AdjustmentRequest, RefundRequest, SpendRequest
from loyalty.application.commands.fields import USER_ID_PATTERN
from loyalty.application.compensation import COMPENSATION_PREFIX
from loyalty.application.explain import PENDING_ALIAS
from loyalty.domain.member import Member
from loyalty.domain.user_ids import MAX_LENGTH, check_user_id

router = APIRouter(tags=["members"])

UserId = Annotated[
    str,
    Path(
        min_length=1,
        max_length=MAX_LENGTH,
        pattern=USER_ID_PATTERN,
        description="a user id (NFC, no control or format characters, no /), percent-encoded",
    ),
    AfterValidator(check_user_id),
]
_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": Problem, "description": "missing or invalid API key"},
    403: {"model": Problem, "description": "the key's role may not do this"},
    404: {"model": Problem, "description": "no such member"},
}


@router.get(
    "/v1/members/{user_id}",
    summary="Read a member's account",
    response_model=MemberBody,
    responses=_ERRORS,
)
async def get_member(user_id: UserId, _key: ShopKey, container: ContainerDep) -> MemberBody:
    """A member's balances, rank and privileges."""

    view = await run_in_threadpool(container.members.view, user_id)
    return account_body(view)


def member_body(container: Container, member: Member) -> MemberBody:
    """The body of ``member``'s account (see ``MemberViews.account``)."""
    return account_body(container.members.account(member))


def account_body(view: AccountView) -> MemberBody:
    return MemberBody(
        user_id=view.user_id,
        currency=view.currency,
        rank_points=view.rank_points,
        rank=view.rank,
        privileges=view.privileges,
        lifetime_currency=view.lifetime_currency,
        pending_currency=view.pending_currency,
        pending_rank_points=view.pending_rank_points,
        expiring=[ExpiringBody(amount=e.amount, on=e.on) for e in view.expiring],
        rank_points_this_period=view.rank_points_this_period,
        rank_valid_until=view.rank_valid_until,
        rank_points_to_keep=view.rank_points_to_keep,
        rank_points_to_next=view.rank_points_to_next,
    )


def _conflicts(*codes: str) -> dict[int | str, dict[str, Any]]:
    return {409: {"model": Problem, "description": " | ".join(codes)}}


_INVALID: dict[int | str, dict[str, Any]] = {
    400: {"model": Problem, "description": "malformed JSON"},
    413: {"model": Problem, "description": "body too large"},
    415: {"model": Problem, "description": "not application/json, or compressed"},
    422: {"model": Problem, "description": "invalid body, or an object repeats a key"},
}


# The header payment APIs send with an idempotent replay (Stripe's name).
REPLAYED_HEADER = "Idempotent-Replayed"
_REPLAY_HEADERS = {
    REPLAYED_HEADER: {
        "description": "`true` when this answer replays an earlier request's result",
        "schema": {"type": "string", "enum": ["true", "false"]},
    }
}


def order_body(result: OrderResult, response: Response) -> OrderBody:
    response.headers[REPLAYED_HEADER] = "true" if result.replayed else "false"
    return OrderBody(
        order_id=result.order_id,
        amount=result.amount,
        currency=result.currency,
        replayed=result.replayed,
    )


@router.post(
    "/v1/members/{user_id}/spend",
    summary="Spend currency on an order",
    response_model=OrderBody,
    responses={
        200: {"headers": _REPLAY_HEADERS},
        **_ERRORS,
        **_INVALID,
        **_conflicts("insufficient_funds", "order_conflict"),
    },
    openapi_extra=request_body(SpendRequest),
)
async def spend(
    user_id: UserId,
    key: ShopKey,
    body: Annotated[SpendRequest, json_body(SpendRequest, Role.SHOP)],
    container: ContainerDep,
    response: Response,
) -> OrderBody:
    """Spend currency on an order (idempotent by the key's source and order id; the
    description is not stored). A repeated request answers with the original result,
    marked `replayed: true` and `Idempotent-Replayed: true`: its `currency` is the balance
    right after the original spend, not now."""
    spending = container.spending
    result = await run_in_threadpool(spending.spend, user_id, body.order_id, body.amount, key.name)
    return order_body(result, response)


@router.post(
    "/v1/members/{user_id}/refunds",
    summary="Refund an order, in full or in part",
    response_model=RefundBody,
    responses={
        200: {"headers": _REPLAY_HEADERS},
        **_ERRORS,
        **_INVALID,
        **_conflicts("refund_exceeds_order", "refund_conflict"),
    },
    openapi_extra=request_body(RefundRequest),
)
async def refund(
    user_id: UserId,
    key: ShopKey,
    body: Annotated[RefundRequest, json_body(RefundRequest, Role.SHOP)],
    container: ContainerDep,
    response: Response,
) -> RefundBody:
    """Refund a spent order in full or in parts, back into the lots it was spent from
    (the newest first; a part whose lot has expired meanwhile expires again at once).
    Each refund is idempotent by its `refund_id` within the order (without one: the
    order's one refund without an id); the refunds of an order add up to at most the
    amount spent (more: 409 `refund_exceeds_order`; a refund id reused with another
    amount: 409 `refund_conflict`). A repeated refund answers the same (marked
    `replayed: true` and `Idempotent-Replayed: true`; `currency` and `refundable` are
    historical). An operator key may name the order's `source` (the shop's key name):
    the refund is then recorded as made by the operator on the shop's behalf."""
    source, by = key.name, None
    if body.source is not None and body.source != key.name:
        if key.role is not Role.OPERATOR:
            raise ApiProblem(403, "forbidden", "only an operator key may name another source")
        source, by = body.source, key.name
    result = await run_in_threadpool(
        container.spending.refund,
        user_id,
        body.order_id,
        source,
        by,
        body.refund_id,
        body.amount,
    )
    response.headers[REPLAYED_HEADER] = "true" if result.replayed else "false"
    return RefundBody(
        order_id=result.order_id,
        refund_id=result.refund_id,
        amount=result.amount,
        currency=result.currency,
        refundable=result.refundable or 0,
        replayed=result.replayed,
    )


@router.post(
    "/v1/members/{user_id}/adjustments",
    summary="Adjust a member's account",
    response_model=AdjustmentBody,
    responses={
        200: {"headers": _REPLAY_HEADERS},
        **_ERRORS,
        **_INVALID,
        **_conflicts("insufficient_funds", "adjustment_conflict"),
    },
    openapi_extra=request_body(AdjustmentRequest),
)
async def adjust(
    user_id: UserId,
    key: OperatorKey,
    body: Annotated[AdjustmentRequest, json_body(AdjustmentRequest, Role.OPERATOR)],
    container: ContainerDep,
    response: Response,
) -> AdjustmentBody:
    """Correct a member's account (creates the account of an unknown member); the
    answer is the account right after the adjustment. Idempotent by the key's source
    and `adjustment_id`: a repeated request answers the original result, marked
    `replayed: true` and `Idempotent-Replayed: true` (the account as right after the
    original adjustment, not now); the same id with other values is a 409
    `adjustment_conflict`."""

    view, replayed = await run_in_threadpool(
        container.members.adjust,
        user_id,
        body.adjustment_id,
        body.currency,
        body.rank_points,
        body.reason,
        key.name,
    )
    response.headers[REPLAYED_HEADER] = "true" if replayed else "false"
    return AdjustmentBody(**account_body(view).model_dump(), replayed=replayed)


_CURSOR = re.compile(r"^h([1-9][0-9]{0,17})$")


def encode_cursor(position: int) -> str:
    return base64.urlsafe_b64encode(f"h{position}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("ascii")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        text = ""
    found = _CURSOR.match(text)
    if found is None:
        raise ApiProblem(
            422,
            "invalid_cursor",
            "the cursor is not one this API returned",
            errors=[{"loc": "cursor", "msg": "invalid cursor"}],
        )
    return int(found.group(1))


def explanation_link(user_id: str, kind: str, ref: str | None) -> str | None:
    """The explanation of an award (and of a rules compensation, an adjustment)."""
    if ref is None or not (kind == "award" or ref.startswith(COMPENSATION_PREFIX)):
        return None
    return f"/v1/members/{quote(user_id, safe='')}/awards/{quote(ref, safe='')}"


@router.get(
    "/v1/members/{user_id}/history",
    summary="Read a member's statement",
    response_model=HistoryBody,
    responses={**_ERRORS, 422: {"model": Problem, "description": "bad limit or cursor"}},
)
async def history(
    user_id: UserId,
    _key: ShopKey,
    container: ContainerDep,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[str | None, Query(max_length=64)] = None,
) -> HistoryBody:
    """A member's statement, newest first (catches up with spending within a second).
    The first page also carries `pending`: the earnings the balance includes that no
    entry lists yet, with the link to their explanation."""
    before = decode_cursor(cursor) if cursor is not None else None

    page = await run_in_threadpool(container.members.history, user_id, limit, before)
    pending = page.pending
    return HistoryBody(
        pending=None
        if pending is None
        else PendingBody(
            currency=pending.currency,
            rank_points=pending.rank_points,
            explanation=explanation_link(user_id, "award", PENDING_ALIAS) or "",
        ),
        entries=[
            HistoryEntryBody(
                kind=r.kind,
                currency=r.currency,
                rank_points=r.rank_points,
                at=r.at,
                ref=r.ref,
                explanation=explanation_link(user_id, r.kind, r.ref),
                reason=r.reason,
            )
            for r in page.entries
        ],
        next=encode_cursor(page.entries[-1].position) if page.more else None,
    )


@router.get(
    "/v1/leaderboard",
    summary="Read the leaderboard",
    response_model=LeaderboardBody,
    responses={
        401: _ERRORS[401],
        403: _ERRORS[403],
        422: {"model": Problem, "description": "bad limit"},
    },
)
async def leaderboard(
    _key: ShopKey,
    container: ContainerDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 10,
) -> LeaderboardBody:
    """Members by lifetime rank points, highest first (ties by user id), each with its
    `position` (equal points share one) and its `rank` name."""

    places = await run_in_threadpool(container.members.leaderboard, limit)
    return LeaderboardBody(
        entries=[
            LeaderboardEntry(
                position=p.position, user_id=p.user_id, rank_points=p.rank_points, rank=p.rank
            )
            for p in places
        ]
    )
