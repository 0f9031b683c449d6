"""What the member routes answer: the member, orders, history, leaderboard, forget."""

from __future__ import annotations

from datetime import date, datetime

from pydantic import (
    BaseModel,
    Field,
)

from loyalty.application.erasure import FORGET_STATUSES
from loyalty.application.projections import HISTORY_KINDS


class MemberBody(BaseModel):
    user_id: str
    currency: int = Field(description="spendable balance")
    rank_points: int = Field(description="lifetime rank points")
    rank: str | None
    privileges: list[str]
    lifetime_currency: int = Field(description="currency ever earned (awards + adjustments)")
    pending_currency: int = Field(
        0,
        description="part of currency earned but not yet recorded on the account "
        "(recorded at the award interval, a rank change or the member's next command)",
    )
    pending_rank_points: int = Field(0, description="part of rank_points not yet recorded")
    expiring: list[ExpiringBody] = Field(
        [],
        description="the next expiries under the rules' currency_expiry, soonest first: "
        "each amount expires at the end of its day (UTC) unless spent first",
    )
    rank_points_this_period: int = Field(
        0,
        description="rank points of the current qualification period (lifetime rank "
        "points when the rules have no rank_qualification)",
    )
    rank_valid_until: date | None = Field(
        None, description="the last day the rank is held without more points (null: kept)"
    )
    rank_points_to_keep: int = Field(0, description="rank points still needed to keep the rank")
    rank_points_to_next: int | None = Field(
        None, description="rank points still needed for the next rank (null: none above)"
    )


class AdjustmentBody(MemberBody):
    """The account right after an adjustment. A repeated request (same adjustment id) is
    not done again: it answers with the account as right after the original one, marked
    ``replayed: true`` and the ``Idempotent-Replayed: true`` header."""

    replayed: bool = Field(
        False,
        description="true: this request repeats an earlier one, which did the work; the "
        "account shown is as right after that one (historical)",
    )


class ExpiringBody(BaseModel):
    amount: int
    on: date = Field(description="expires at the end of this day (UTC)")


class OrderBody(BaseModel):
    """The result of a spend or refund. A repeated request (same order id) is not done
    again: it answers with the original result, marked ``replayed: true`` and the
    ``Idempotent-Replayed: true`` header. ``amount`` and ``currency`` are then historical
    (as right after the original request); read ``GET /v1/members/{user_id}`` for the
    balance now."""

    order_id: str
    amount: int = Field(description="the amount spent or refunded by the original request")
    currency: int = Field(
        description="the member's balance right after the original request (historical on "
        "a replay: later awards, spends and refunds are not in it)"
    )
    replayed: bool = Field(
        False,
        description="true: this request repeats an earlier one, which did the work; this is "
        "that request's result (the response also carries `Idempotent-Replayed: true`)",
    )


class RefundBody(OrderBody):
    """The result of a refund. A repeated request (same order id and refund id) is not
    done again: it answers with the original result, marked ``replayed: true`` and the
    ``Idempotent-Replayed: true`` header; ``amount``, ``currency`` and ``refundable`` are
    then historical."""

    amount: int = Field(description="the amount refunded by the original request")
    refund_id: str | None = Field(
        None, description="the refund's id within the order (null: made without one)"
    )
    refundable: int = Field(
        description="what was left to refund of the order right after the original request"
    )


class HistoryEntryBody(BaseModel):
    kind: str = Field(
        description="award | spend | refund | adjustment | expiry (currency of a month "
        "lot expired; ref: the lot) | rank_changed (ref: the new rank)",
        json_schema_extra={"enum": list(HISTORY_KINDS)},
    )
    currency: int = Field(description="signed change of the spendable balance")
    rank_points: int = Field(description="signed change of the rank points")
    at: datetime = Field(description="RFC 3339, UTC")
    ref: str | None = Field(description="award id, order id, adjustment id or new rank")
    explanation: str | None = Field(None, description="for an award: the path of its explanation")
    reason: str | None = Field(
        None, description="for an adjustment: its reason (null for every other kind)"
    )


class PendingBody(BaseModel):
    """Earnings in the balance that no entry lists yet: weighed by the pipeline, not yet
    recorded on the account (recorded at the award interval, a rank change or the
    member's next command, then listed as an ``award``)."""

    currency: int = Field(description="the pending part of the balance's currency")
    rank_points: int = Field(description="the pending part of the rank points")
    explanation: str = Field(description="the path of the pending award's explanation")


class HistoryBody(BaseModel):
    pending: PendingBody | None = Field(
        None,
        description="first page only: what the balance holds that no entry lists yet "
        "(null: nothing pending, or a later page); the entries plus this add up to the "
        "balance",
    )
    entries: list[HistoryEntryBody]
    next: str | None = Field(description="cursor of the next (older) page; null at the end")


class LeaderboardEntry(BaseModel):
    position: int = Field(
        description="place on the leaderboard, 1 for the most rank points; members with "
        "equal rank points share a position and the next one skips (1, 2, 2, 4)"
    )
    user_id: str
    rank_points: int = Field(description="lifetime rank points")
    rank: str | None = Field(description="the name of the member's rank (not a position)")


class LeaderboardBody(BaseModel):
    entries: list[LeaderboardEntry]


class ForgetAccepted(BaseModel):
    request_id: str
    status: str = Field(
        description="pending | running | completed",
        json_schema_extra={"enum": list(FORGET_STATUSES)},
    )


class ForgetReceipt(BaseModel):
    """What was erased, where and when; never the user id."""

    request_id: str
    status: str = Field(
        description="pending | running | completed",
        json_schema_extra={"enum": list(FORGET_STATUSES)},
    )
    requested_at: datetime
    completed_at: datetime | None
    erased: dict[str, int] = Field(description="rows erased per location")
