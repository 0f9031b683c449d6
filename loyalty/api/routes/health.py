"""Liveness and readiness."""

from __future__ import annotations

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from loyalty.api.deps import ContainerDep
from loyalty.api.schemas import Health, Problem

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="Liveness", response_model=Health)
def healthz() -> Health:
    """The process is up."""
    return Health(status="ok")


@router.get(
    "/readyz",
    summary="Readiness (database and activity log reachable)",
    response_model=Health,
    responses={
        503: {
            "model": Problem,
            "description": "the database, or the JetStream activity log, is unreachable",
        }
    },
)
async def readyz(container: ContainerDep) -> Health:
    """The process can reach its database, and the NATS JetStream stream when the
    activity log is there (``LOYALTY_INGRESS_URL``)."""
    await run_in_threadpool(container.ready)
    return Health(status="ready")
