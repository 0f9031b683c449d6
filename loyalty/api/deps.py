"""Request dependencies: the process's container and bearer-key authorization."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ValidationError

from loyalty.adapters.console_sessions import ConsoleSessions
from loyalty.adapters.db import Database
from loyalty.adapters.ingress_log import pending_stats
from loyalty.adapters.keys import KeyStore, Principal, Role
from loyalty.adapters.pipeline_store import PipelineStore
from loyalty.adapters.read_models import ReadModels
from loyalty.adapters.rules_store import RulesStore
from loyalty.adapters.webhook_sender import HttpWebhookSender
from loyalty.api.guards import (
    BodyProblem,
    RateLimiter,
    check_json_content_type,
    parse_json_document,
    read_limited_body,
)
from loyalty.api.problems import ApiProblem, malformed_json, validation_errors
from loyalty.application.accounts import Accounts, Spending
from loyalty.application.delivery import EventFeed, WebhookAdmin
from loyalty.application.dryrun import DryRun
from loyalty.application.erasure import ForgetService
from loyalty.application.explain import Explanations
from loyalty.application.ingress import IngestService
from loyalty.application.member_view import MemberViews
from loyalty.application.operations import PipelineMonitor
from loyalty.application.reporting import RollupReader
from loyalty.config import Settings
from loyalty.observability import Metrics


@dataclass
class Container:
    """Everything a request handler may need, built once in ``create_app``."""

    settings: Settings
    db: Database
    keys: KeyStore
    ingest: IngestService
    accounts: Accounts
    rules: RulesStore
    pipeline_state: PipelineStore
    clock: Callable[[], datetime]
    spending: Spending
    read_models: ReadModels
    metrics: Metrics
    forget: ForgetService
    ingest_limiter: RateLimiter = field(default_factory=lambda: RateLimiter(0.0, 0.0))
    feed: Callable[[], EventFeed] | None = None
    """The account event feed (built on first use, like the event store application)."""
    webhooks: WebhookAdmin | None = None
    rollups: RollupReader | None = None
    """The daily rollups (``GET /v1/reports/daily``)."""
    explanations: Explanations | None = None
    """Award explanations (issue 20)."""
    dry_run: DryRun | None = None
    """Rule dry runs (issue 20)."""
    webhook_sender: Callable[[], HttpWebhookSender] | None = None
    """A sender for replaying dead letters (a new one per replay; closed after it)."""
    console_sessions: ConsoleSessions | None = None


def get_container(request: Request) -> Container:
    container: Container = request.app.state.container
    return container


ContainerDep = Annotated[Container, Depends(get_container)]

_bearer = HTTPBearer(auto_error=False, description="an API key: lk_<id>_<secret>")
_UNAUTHORIZED_HEADERS = {"WWW-Authenticate": "Bearer"}


def authenticate(
    container: ContainerDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    if credentials is None:
        raise ApiProblem(
            401,
            "missing_api_key",
            "send Authorization: Bearer <key>",
            headers=_UNAUTHORIZED_HEADERS,
        )
    principal = container.keys.verify(credentials.credentials)
    if principal is None:
        raise ApiProblem(
            401,
            "invalid_api_key",
            "the API key is unknown or revoked",
            headers=_UNAUTHORIZED_HEADERS,
        )
    return principal


@functools.cache
def require(role: Role) -> Callable[[Principal], Principal]:
    """The dependency checking that the key may act as ``role`` (one function per role,
    so that FastAPI resolves it once per request however many dependencies need it)."""

    def check(principal: Annotated[Principal, Depends(authenticate)]) -> Principal:
        if not principal.may(role):
            article = "an" if role.value[0] in "aeiou" else "a"
            raise ApiProblem(403, "forbidden", f"this endpoint needs {article} {role.value} key")
        return principal

    return check


def problem_of(exc: BodyProblem) -> ApiProblem:
    errors = [{"loc": exc.loc, "msg": "this key appears twice in its object"}]
    return ApiProblem(
        exc.status, exc.code, exc.detail, errors=errors if exc.code == "duplicate_key" else None
    )


async def read_json_body(
    request: Request, limit: int, code: str = "body_too_large"
) -> tuple[bytes, Any]:
    """The request's body and JSON document, after the key check (call it from a route or a
    dependency that depends on one): 415 for another content type or a compressed
    body, 413 over ``limit`` bytes (read counted, never buffered beyond), 400 for
    malformed JSON, 422 ``duplicate_key`` for an object repeating a key (judged by a
    real parser's view of the document, every object's pairs)."""
    try:
        check_json_content_type(request.headers)
        body = await read_limited_body(request.headers, request.stream(), limit, code)
        return body, parse_json_document(body)
    except BodyProblem as exc:
        raise problem_of(exc) from None


M = TypeVar("M", bound=BaseModel)


def json_body(model: type[M], role: Role) -> Any:
    """A dependency giving the request body as ``model``, parsed only once the key has
    been checked for ``role`` (FastAPI would otherwise read and parse a declared body
    before any dependency runs). Errors: see :func:`read_json_body`; schema errors 422
    ``validation_error``."""

    async def parse(
        request: Request,
        container: ContainerDep,
        _principal: Annotated[Principal, Depends(require(role))],
    ) -> M:
        body, _document = await read_json_body(request, container.settings.max_request_bytes)
        try:
            return model.model_validate_json(body)
        except ValidationError as exc:
            errors = exc.errors(include_input=False, include_url=False)
            if any(e["type"] == "json_invalid" for e in errors):
                raise malformed_json(errors) from None
            raise ApiProblem(422, "validation_error", errors=validation_errors(errors)) from None

    parse.__name__ = f"{model.__name__}_body"
    # Real objects, not this module's postponed annotations: ``role`` and ``model`` are
    # locals that FastAPI could not resolve from a string.
    parse.__annotations__ = {
        "request": Request,
        "container": ContainerDep,
        "_principal": Annotated[Principal, Depends(require(role))],
        "return": model,
    }
    return Depends(parse)


IngestKey = Annotated[Principal, Depends(require(Role.INGEST))]
ShopKey = Annotated[Principal, Depends(require(Role.SHOP))]
OperatorKey = Annotated[Principal, Depends(require(Role.OPERATOR))]
FeedKey = Annotated[Principal, Depends(require(Role.FEED))]


def request_body(model: type[BaseModel]) -> dict[str, Any]:
    """``openapi_extra`` documenting a body read by :func:`json_body` (its schema is
    added to the document's components by ``create_app``)."""
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


# Use cases the API and the console share, built from the container's parts on each
# request (cheap: no I/O) until the container holds them.


def member_views(container: ContainerDep) -> MemberViews:
    return MemberViews(container.accounts, container.rules, container.clock)


def pipeline_monitor(container: ContainerDep) -> PipelineMonitor:
    db, shards = container.db, container.settings.shard_count
    return PipelineMonitor(
        container.pipeline_state,
        lambda positions: pending_stats(db, positions, shards),
        container.read_models,
        container.clock,
    )


MemberViewsDep = Annotated[MemberViews, Depends(member_views)]
PipelineMonitorDep = Annotated[PipelineMonitor, Depends(pipeline_monitor)]
