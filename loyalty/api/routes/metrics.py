"""GET /metrics: prometheus text exposition of this process's registry (no auth)."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from loyalty.api.deps import ContainerDep

router = APIRouter(tags=["health"])

_EXAMPLE = (
    "# HELP loyalty_ingest_events_total ingress events by source and outcome\n"
    "# TYPE loyalty_ingest_events_total counter\n"
    'loyalty_ingest_events_total{outcome="accepted",source="gamesite"} 1200.0\n'
)


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {
            "description": "prometheus text format 0.0.4",
            "content": {"text/plain": {"example": _EXAMPLE}},
        }
    },
)
def get_metrics(container: ContainerDep) -> Response:
    """Prometheus metrics of this process (HTTP, ingest, pipeline, accounts, projections)."""
    return Response(generate_latest(container.metrics.exposition), media_type=CONTENT_TYPE_LATEST)
