"""GET /metrics: prometheus text exposition of this process's registry. Only on an API
whose settings name a ``metrics_token``, and only with that token: the figures name
key sources and carry operator-only totals. (``serve`` can also expose them on a port
of their own, ``LOYALTY_METRICS_PORT``, loopback by default.)"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import APIRouter, Depends, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from loyalty.api.deps import ContainerDep
from loyalty.api.problems import ApiProblem
from loyalty.api.schemas import Problem

router = APIRouter(tags=["health"])

_EXAMPLE = (
    "# HELP loyalty_ingest_events_total ingress events by source and outcome\n"
    "# TYPE loyalty_ingest_events_total counter\n"
    'loyalty_ingest_events_total{outcome="accepted",source="gamesite"} 1200.0\n'
)


_bearer = HTTPBearer(auto_error=False, description="LOYALTY_METRICS_TOKEN")


def metrics_token(
    container: ContainerDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    expected = container.settings.metrics_token
    sent = credentials.credentials if credentials is not None else ""
    if expected is None or not hmac.compare_digest(
        sent.encode(), expected.get_secret_value().encode()
    ):
        raise ApiProblem(
            401,
            "invalid_metrics_token",
            "send Authorization: Bearer <LOYALTY_METRICS_TOKEN>",
            headers={"WWW-Authenticate": "Bearer"},
        )


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    dependencies=[Depends(metrics_token)],
    responses={
        200: {
            "description": "prometheus text format 0.0.4",
            "content": {"text/plain": {"example": _EXAMPLE}},
        },
        401: {"model": Problem, "description": "missing or wrong metrics token"},
    },
)
def get_metrics(container: ContainerDep) -> Response:
    """Prometheus metrics of this process (HTTP, ingest, pipeline, accounts, projections)."""
    return Response(generate_latest(container.metrics.exposition), media_type=CONTENT_TYPE_LATEST)
