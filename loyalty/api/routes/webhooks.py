"""Webhook subscriptions (operator): where account events are POSTed, signed."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from loyalty.api.deps import ContainerDep, OperatorKey, json_body, request_body
from loyalty.api.problems import ApiProblem
from loyalty.api.schemas import Problem
from loyalty.application.access import Role
from loyalty.application.delivery import EVENT_TYPES, Subscription, WebhookAdmin

router = APIRouter(tags=["events out"])

_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": Problem, "description": "missing or invalid API key"},
    403: {"model": Problem, "description": "needs an operator key"},
}


class WebhookCreate(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "url": "https://crm.example.com/hooks/loyalty",
                    "event_types": ["member.rank_changed", "member.forgotten"],
                }
            ]
        },
    )

    url: str = Field(min_length=8, max_length=2048, description="http(s) URL to POST events to")
    event_types: list[str] = Field(
        default_factory=list,
        max_length=len(EVENT_TYPES),
        description="the event types to deliver (empty: all): " + ", ".join(EVENT_TYPES),
        json_schema_extra={"items": {"type": "string", "enum": list(EVENT_TYPES)}},
    )


SUBSCRIPTION_EXAMPLE: dict[str, Any] = {
    "subscription_id": "5f0c3b2a9d8e4f7a8b6c5d4e3f2a1b0c",
    "url": "https://crm.example.com/hooks/loyalty",
    "event_types": ["member.rank_changed", "member.forgotten"],
    "created_at": "2026-11-29T10:00:00Z",
    "status": "failing",
    "failing_since": "2026-11-29T10:05:00Z",
    "last_error": "HTTP 503",
}


class WebhookOut(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [SUBSCRIPTION_EXAMPLE]})

    subscription_id: str
    url: str
    event_types: list[str]
    created_at: datetime
    status: Literal["delivering", "failing"] = Field(
        description="failing: its last delivery attempt (or its delivery loop) failed"
    )
    failing_since: datetime | None = Field(description="since when it fails (null: it does not)")
    last_error: str | None = Field(description="what failed last: a status or an error kind")


class WebhookCreated(WebhookOut):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {**SUBSCRIPTION_EXAMPLE, "secret": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"}
            ]
        }
    )

    secret: str = Field(
        description="the signing secret (Standard Webhooks, whsec_...): shown only once"
    )


class WebhookList(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"subscriptions": [SUBSCRIPTION_EXAMPLE]}]}
    )

    subscriptions: list[WebhookOut]


class WebhookDeleted(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"subscription_id": "5f0c3b2a9d8e4f7a8b6c5d4e3f2a1b0c", "deleted": True}]
        }
    )

    subscription_id: str
    deleted: bool


def _out(s: Subscription) -> WebhookOut:
    return WebhookOut(
        subscription_id=s.subscription_id,
        url=s.url,
        event_types=list(s.event_types),
        created_at=s.created_at,
        status="failing" if s.failing_since is not None else "delivering",
        failing_since=s.failing_since,
        last_error=s.last_error,
    )


def _admin(container: ContainerDep) -> WebhookAdmin:
    assert container.webhooks is not None
    return container.webhooks


@router.post(
    "/v1/webhooks",
    summary="Subscribe a webhook",
    status_code=201,
    response_model=WebhookCreated,
    responses={
        **_ERRORS,
        400: {"model": Problem, "description": "malformed JSON"},
        413: {"model": Problem, "description": "body too large"},
        415: {"model": Problem, "description": "not application/json, or compressed"},
        422: {"model": Problem, "description": "invalid body, refused URL or event type"},
    },
    openapi_extra=request_body(WebhookCreate),
)
async def create_webhook(
    _key: OperatorKey,
    body: Annotated[WebhookCreate, json_body(WebhookCreate, Role.OPERATOR)],
    container: ContainerDep,
) -> WebhookCreated:
    """Subscribe a URL to account events committed from now on; the secret is shown once."""
    try:
        created = await run_in_threadpool(_admin(container).create, body.url, body.event_types)
    except ValueError as exc:
        raise ApiProblem(422, "webhook_refused", str(exc)) from None
    return WebhookCreated(**_out(created).model_dump(), secret=created.secret)


@router.get(
    "/v1/webhooks",
    summary="List webhook subscriptions",
    response_model=WebhookList,
    responses=_ERRORS,
)
async def list_webhooks(_key: OperatorKey, container: ContainerDep) -> WebhookList:
    """Every subscription (never the secrets)."""
    subscriptions = await run_in_threadpool(_admin(container).subscriptions)
    return WebhookList(subscriptions=[_out(s) for s in subscriptions])


@router.delete(
    "/v1/webhooks/{subscription_id}",
    summary="Delete a webhook subscription",
    response_model=WebhookDeleted,
    responses={**_ERRORS, 404: {"model": Problem, "description": "no such subscription"}},
)
async def delete_webhook(
    subscription_id: Annotated[str, Path(pattern=r"^[0-9a-f]{32}$")],
    _key: OperatorKey,
    container: ContainerDep,
) -> WebhookDeleted:
    """Unsubscribe: deliveries stop; its cursor and dead letters are deleted."""
    if not await run_in_threadpool(_admin(container).delete, subscription_id):
        raise ApiProblem(404, "webhook_not_found", "no such subscription")
    return WebhookDeleted(subscription_id=subscription_id, deleted=True)
