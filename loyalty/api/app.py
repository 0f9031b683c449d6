"""The FastAPI application, composed from settings in one place."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from loyalty.adapters.db import Database
from loyalty.api import problems
from loyalty.api.deps import Container
from loyalty.api.docs import install_docs
from loyalty.api.guards import BodyGuardMiddleware, RateLimiter, SecurityHeadersMiddleware
from loyalty.api.routes import explain as explain_routes
from loyalty.api.routes import feed as feed_routes
from loyalty.api.routes import forget as forget_routes
from loyalty.api.routes import health, ingress, operations
from loyalty.api.routes import members as member_routes
from loyalty.api.routes import metrics as metrics_routes
from loyalty.api.routes import reports as report_routes
from loyalty.api.routes import storage as storage_routes
from loyalty.api.routes import webhooks as webhook_routes
from loyalty.api.routes.webhooks import WebhookCreate
from loyalty.api.schemas import Problem
from loyalty.application.accounts import Members
from loyalty.application.commands.accounts import AdjustmentRequest, RefundRequest, SpendRequest
from loyalty.application.commands.forget import ForgetRequestBody
from loyalty.application.commands.ingress import Batch
from loyalty.application.commands.periods import DryRunRequest
from loyalty.application.commands.rules import RulesBody, RulesRequest
from loyalty.bootstrap import build_api_services
from loyalty.config import Settings
from loyalty.console.routes import install_console
from loyalty.observability import Metrics, MetricsMiddleware, RequestIdMiddleware

BATCH_EXAMPLE: dict[str, Any] = {
    "batch_id": "b-1",
    "events": [
        {
            "event_id": "e-1",
            "user_id": "alice",
            "type": "logged_on",
            "occurred_at": "2026-11-26T10:00:00Z",
        },
        {
            "event_id": "e-2",
            "user_id": "alice",
            "type": "played_game",
            "occurred_at": "2026-11-26T10:02:13.250+01:00",
            "attributes": {"game": "chess", "result": "win"},
        },
    ],
}
"""The request example of POST /v1/ingress/batches at /docs."""


def utc_now() -> datetime:
    return datetime.now(UTC)


def build_container(
    settings: Settings,
    *,
    db: Database | None = None,
    clock: Callable[[], datetime] = utc_now,
    members: Members | None = None,
    metrics: Metrics | None = None,
) -> Container:
    services = build_api_services(settings, db=db, clock=clock, members=members, metrics=metrics)
    limiter = RateLimiter(
        settings.ingest_rate_limit_events_per_s,
        max(settings.ingest_rate_limit_burst, settings.max_batch_events),
    )
    return Container.of(services, limiter)


def api_description(settings: Settings) -> str:
    """The OpenAPI document's description: what the service is and the ingress limits
    of this deployment (from its settings, so the document says what the server does)."""
    rate = settings.ingest_rate_limit_events_per_s
    rate_text = (
        "no rate limit per key"
        if not rate
        else f"at most {rate:,.0f} events per second per ingest key, bursts up to "
        f"{max(settings.ingest_rate_limit_burst, settings.max_batch_events):,} (429 "
        "`rate_limited` with `Retry-After` above it, nothing stored)"
    )
    return (
        "Event-sourced loyalty service: activity ingress, member accounts (spend, refunds "
        "in full or in parts, adjustments, statements, leaderboard), explanations, rules, "
        "events out (feed, webhooks).\n\n"
        "**Ingress limits** (`POST /v1/ingress/batches`): a batch body of at most "
        f"{settings.max_batch_bytes:,} bytes (413 before parsing), at most "
        f"{settings.max_batch_events:,} events per batch (413 `too_many_events`), "
        f"{settings.max_attributes_bytes:,} bytes of `attributes` per event (422), events "
        f"no older than {settings.retention_days} days (`LOYALTY_RETENTION_DAYS`) and at "
        f"most {settings.future_skew_seconds} s in the future (listed in `rejected`); "
        f"{rate_text}. Any other request body: at most {settings.max_request_bytes:,} "
        "bytes (413)."
    )


def create_app(
    settings: Settings,
    *,
    db: Database | None = None,
    clock: Callable[[], datetime] = utc_now,
    members: Members | None = None,
    metrics: Metrics | None = None,
) -> FastAPI:
    """Build the API for ``settings``. The schema must already be migrated.

    ``metrics`` lets the caller share one registry with an embedded worker; by default
    the app gets its own (served at ``GET /metrics`` when ``settings.metrics_token`` is
    set, to callers sending it)."""
    container = build_container(settings, db=db, clock=clock, members=members, metrics=metrics)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        if db is None:  # we built it, we close it
            container.db.dispose()
        if members is None:
            container.accounts.close()

    app = FastAPI(
        title="loyalty",
        version="1",
        description=api_description(settings),
        lifespan=lifespan,
        # A redirect to the slash-less path would echo the Host header in Location.
        redirect_slashes=False,
        docs_url=None,  # served from vendored assets by install_docs
        redoc_url=None,  # ReDoc would load from a CDN: Swagger UI only
    )
    app.state.container = container
    problems.install(app)
    install_docs(app)
    install_console(app)
    app.include_router(health.router)
    app.include_router(ingress.router)
    app.include_router(member_routes.router)
    app.include_router(explain_routes.router)
    app.include_router(operations.router)
    app.include_router(forget_routes.router)
    if settings.metrics_token is not None:  # else not on the API's listener at all
        app.include_router(metrics_routes.router)
    app.include_router(storage_routes.router)
    app.include_router(report_routes.router)
    app.include_router(feed_routes.router)
    app.include_router(webhook_routes.router)
    # Request ids outermost, so that everything (metrics, handlers, errors) logs with one.
    app.add_middleware(BodyGuardMiddleware, limit=settings.max_request_bytes)
    app.add_middleware(MetricsMiddleware, metrics=container.metrics)
    app.add_middleware(SecurityHeadersMiddleware)
    app.add_middleware(RequestIdMiddleware)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title, version=app.version, description=app.description, routes=app.routes
            )
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in (
                Batch,
                Problem,
                RulesBody,
                RulesRequest,
                DryRunRequest,
                SpendRequest,
                RefundRequest,
                AdjustmentRequest,
                ForgetRequestBody,
                WebhookCreate,
            ):
                model_schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(model_schema.pop("$defs", {}))
                components[model.__name__] = model_schema
            components["Batch"]["examples"] = [BATCH_EXAMPLE]
            problems.document_problems(schema)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def create_app_from_env() -> FastAPI:
    """Factory for ``uvicorn --factory`` (settings from ``LOYALTY_*``)."""
    return create_app(Settings())
