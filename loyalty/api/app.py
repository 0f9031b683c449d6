"""The FastAPI application, composed from settings in one place."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from loyalty.adapters.db import Database
from loyalty.adapters.event_store import event_store_env
from loyalty.adapters.ingress_log import create_ingress_log
from loyalty.adapters.keys import KeyStore
from loyalty.adapters.pipeline_store import PipelineStore
from loyalty.adapters.read_models import ReadModels
from loyalty.adapters.rules_store import RulesStore
from loyalty.api import problems
from loyalty.api.deps import Container
from loyalty.api.routes import health, ingress, operations
from loyalty.api.routes import members as member_routes
from loyalty.api.schemas import Batch, Problem, RulesBody
from loyalty.application.accounts import Accounts, Members, Spending
from loyalty.application.ingress import IngestService
from loyalty.config import Settings


def utc_now() -> datetime:
    return datetime.now(UTC)


def build_container(
    settings: Settings,
    *,
    db: Database | None = None,
    clock: Callable[[], datetime] = utc_now,
    members: Members | None = None,
) -> Container:
    db = db or Database(settings)
    env = event_store_env(settings)
    accounts = Accounts(members or (lambda: Members(env=env)))
    return Container(
        settings=settings,
        db=db,
        keys=KeyStore(db, settings.auth_cache_seconds),
        ingest=IngestService(
            create_ingress_log(db),
            clock=clock,
            retention=timedelta(days=settings.retention_days),
            future_skew=timedelta(seconds=settings.future_skew_seconds),
            shard_count=settings.shard_count,
        ),
        accounts=accounts,
        rules=RulesStore(db),
        pipeline_state=PipelineStore(db),
        clock=clock,
        spending=Spending(accounts),
        read_models=ReadModels(db),
    )


def create_app(
    settings: Settings,
    *,
    db: Database | None = None,
    clock: Callable[[], datetime] = utc_now,
    members: Members | None = None,
) -> FastAPI:
    """Build the API for ``settings``. The schema must already be migrated."""
    container = build_container(settings, db=db, clock=clock, members=members)

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
        description="Event-sourced loyalty service: activity ingress, member accounts.",
        lifespan=lifespan,
    )
    app.state.container = container
    problems.install(app)
    app.include_router(health.router)
    app.include_router(ingress.router)
    app.include_router(member_routes.router)
    app.include_router(operations.router)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title, version=app.version, description=app.description, routes=app.routes
            )
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in (Batch, Problem, RulesBody):
                model_schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(model_schema.pop("$defs", {}))
                components[model.__name__] = model_schema
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def create_app_from_env() -> FastAPI:
    """Factory for ``uvicorn --factory`` (settings from ``LOYALTY_*``)."""
    return create_app(Settings())
