"""Request dependencies: the process's container and bearer-key authorization."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from loyalty.adapters.db import Database
from loyalty.adapters.keys import KeyStore, Principal, Role
from loyalty.adapters.pipeline_store import PipelineStore
from loyalty.adapters.read_models import ReadModels
from loyalty.adapters.rules_store import RulesStore
from loyalty.api.guards import RateLimiter
from loyalty.api.problems import ApiProblem
from loyalty.application.accounts import Accounts, Spending
from loyalty.application.delivery import EventFeed, WebhookAdmin
from loyalty.application.erasure import ForgetService
from loyalty.application.ingress import IngestService
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


def require(role: Role) -> Callable[[Principal], Principal]:
    def check(principal: Annotated[Principal, Depends(authenticate)]) -> Principal:
        if not principal.may(role):
            raise ApiProblem(403, "forbidden", f"this endpoint needs a {role.value} key")
        return principal

    return check


IngestKey = Annotated[Principal, Depends(require(Role.INGEST))]
ShopKey = Annotated[Principal, Depends(require(Role.SHOP))]
OperatorKey = Annotated[Principal, Depends(require(Role.OPERATOR))]
FeedKey = Annotated[Principal, Depends(require(Role.FEED))]
