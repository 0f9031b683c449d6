"""The account event feed (feed or operator keys): committed events in commit order."""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from loyalty.api.deps import ContainerDep, FeedKey
from loyalty.api.problems import ApiProblem
from loyalty.api.schemas import Problem
from loyalty.application.delivery import (
    EVENT_TYPES,
    FORGOTTEN,
    MAX_LIMIT,
    MAX_WAIT_SECONDS,
    decode_cursor,
    encode_cursor,
)

router = APIRouter(tags=["events out"])

EVENT_EXAMPLE: dict[str, Any] = {
    "id": "0b8f3c1e-6f1b-5d8e-9a57-2f3a4c5d6e7f",
    "type": "member.awarded",
    "user_id": "alice",
    "occurred_at": "2026-11-29T10:00:01.250000Z",
    "data": {
        "award_id": "w3.1042.77",
        "currency": 26,
        "rank_points": 26,
        "event_count": 3,
        "rule_version": 1,
    },
}


class FeedItem(BaseModel):
    """One committed account event."""

    model_config = ConfigDict(json_schema_extra={"examples": [EVENT_EXAMPLE]})

    id: str = Field(description="stable event id: the same on every read (deduplicate by it)")
    type: str = Field(
        description=", ".join(t for t in EVENT_TYPES if t != FORGOTTEN)
        + " (more may come: ignore unknown types)",
        json_schema_extra={"examples": [t for t in EVENT_TYPES if t != FORGOTTEN]},
    )
    user_id: str
    occurred_at: datetime = Field(description="when the event was recorded (UTC)")
    data: dict[str, Any] = Field(description="the event's fields (more may come)")


class FeedResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"events": [EVENT_EXAMPLE], "next": "ZmVlZC52MS40Mg"}]}
    )

    events: list[FeedItem]
    next: str = Field(description="opaque cursor: pass it as `after` for the next page")


@router.get(
    "/v1/feed",
    summary="Read the account event feed",
    response_model=FeedResponse,
    responses={
        400: {"model": Problem, "description": "the cursor is not one this feed gave out"},
        401: {"model": Problem, "description": "missing or invalid API key"},
        403: {"model": Problem, "description": "needs a feed or operator key"},
    },
)
async def get_feed(
    _key: FeedKey,
    container: ContainerDep,
    after: Annotated[
        str | None,
        Query(max_length=64, description="the `next` of the previous page (omit: start)"),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT, description="most events per page")] = 100,
    wait: Annotated[
        float,
        Query(ge=0, le=MAX_WAIT_SECONDS, description="seconds to wait when nothing is new"),
    ] = 0.0,
) -> FeedResponse:
    """Committed account events after a cursor, in commit order (long-poll with `wait`)."""
    try:
        position = decode_cursor(after)
    except ValueError:
        raise ApiProblem(400, "invalid_cursor", "`after` is not a cursor of this feed") from None
    assert container.feed is not None
    feed = await run_in_threadpool(container.feed)
    page = await feed.wait_read(position, limit, wait, run_in_threadpool, asyncio.sleep)
    return FeedResponse(
        events=[FeedItem(**event.body()) for event in page.events],
        next=encode_cursor(page.position),
    )
