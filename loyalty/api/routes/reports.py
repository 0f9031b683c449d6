"""Operator endpoint: the daily report, from the rollups (kept forever), so a past day
reads the same before and after retention dropped its activity."""

from __future__ import annotations

from datetime import date
from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from loyalty.api.deps import ContainerDep, OperatorKey
from loyalty.api.problems import ApiProblem
from loyalty.api.schemas import Problem
from loyalty.application.commands.fields import Day
from loyalty.application.reporting import FIGURE_LABELS, ReportRangeError

router = APIRouter(tags=["operations"])

Amount = int | str
"""An exact decimal: an integer, or a plain decimal string ("12.5")."""


class ActivityBody(BaseModel):
    source: str = Field(description="the ingest key's name")
    event_type: str
    events: int = Field(description="events that occurred this UTC day")
    earning_events: int = Field(description="events with a non-zero weight (not capped)")
    members: int = Field(description="distinct members (HyperLogLog estimate, ~1.6 % error)")
    currency_awarded: Amount = Field(description="exact sum of the events' currency weights")
    rank_points_awarded: Amount


def _figure_titles(schema: dict[str, Any]) -> None:
    """Each figure titled with its label, the same as the console's and the CLI's."""
    for name, prop in schema.get("properties", {}).items():
        if name in FIGURE_LABELS:
            prop["title"] = FIGURE_LABELS[name]


class DayBody(BaseModel):
    model_config = ConfigDict(json_schema_extra=_figure_titles)

    day: date
    events: int
    earning_events: int
    active_members: int = Field(description="distinct members with activity (estimate)")
    currency_awarded: Amount = Field(description="exact, before rounding (sum of `activity`)")
    rank_points_awarded: Amount
    currency_credited: int = Field(description="whole currency credited on accounts by awards")
    rank_points_credited: int
    currency_spent: int
    currency_refunded: int
    currency_adjusted: int
    rank_points_adjusted: int
    currency_expired: int
    currency_forgotten: int = Field(description="balances erased by forget-me")
    new_members: int
    members: int = Field(description="accounts at the end of the day")
    members_with_balance: int = Field(description="accounts with currency > 0, end of day")
    members_per_rank: dict[str, int] = Field(description="end of day")
    outstanding_currency: int = Field(description="currency on all accounts at the end of the day")
    activity: list[ActivityBody] = Field(description="per source x event type")
    unweighed_types: dict[str, int] = Field(
        {},
        description="the day's events per type that no rule of the current rule set "
        "weighs: accepted and stored, earning nothing now (a new rule set or a dry run may "
        "weigh them)",
    )


DAILY_EXAMPLE: dict[str, Any] = {
    "days": [
        {
            "day": "2026-11-28",
            "events": 3,
            "earning_events": 2,
            "active_members": 2,
            "currency_awarded": "16.5",
            "rank_points_awarded": 15,
            "currency_credited": 16,
            "rank_points_credited": 15,
            "currency_spent": 10,
            "currency_refunded": 0,
            "currency_adjusted": 0,
            "rank_points_adjusted": 0,
            "currency_expired": 0,
            "currency_forgotten": 0,
            "new_members": 2,
            "members": 2,
            "members_with_balance": 1,
            "members_per_rank": {"bronze": 2},
            "outstanding_currency": 6,
            "activity": [
                {
                    "source": "gamesite",
                    "event_type": "logged_on",
                    "events": 2,
                    "earning_events": 1,
                    "members": 1,
                    "currency_awarded": 1,
                    "rank_points_awarded": 1,
                },
                {
                    "source": "shop",
                    "event_type": "made_purchase",
                    "events": 1,
                    "earning_events": 1,
                    "members": 1,
                    "currency_awarded": "15.5",
                    "rank_points_awarded": 14,
                },
            ],
        }
    ]
}


class DailyReportBody(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [DAILY_EXAMPLE]})

    days: list[DayBody]


@router.get(
    "/v1/reports/daily",
    summary="Read the daily report",
    response_model=DailyReportBody,
    responses={
        401: {"model": Problem, "description": "missing or invalid API key"},
        403: {"model": Problem, "description": "needs an operator key"},
        422: {"model": Problem, "description": "`to` before `from`, or too many days"},
    },
)
async def get_daily_report(
    _key: OperatorKey,
    container: ContainerDep,
    first: Annotated[Day, Query(alias="from", description="first UTC day (YYYY-MM-DD)")],
    last: Annotated[Day, Query(alias="to", description="last UTC day, inclusive")],
) -> Any:
    """Per UTC day: activity by source and type, awards, spending, outstanding currency."""
    try:
        days = await run_in_threadpool(container.daily_report, first, last)
    except ReportRangeError as exc:
        raise ApiProblem(422, "invalid_range", str(exc)) from None
    return {"days": [d.to_wire() for d in days]}
