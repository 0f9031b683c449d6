"""Operator endpoint: rows and bytes per storage location (see ``loyalty storage``)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from loyalty.api.deps import ContainerDep, OperatorKey
from loyalty.api.schemas import Problem, StorageBody

router = APIRouter(tags=["operations"])

_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": Problem, "description": "missing or invalid API key"},
    403: {"model": Problem, "description": "needs an operator key"},
}


@router.get(
    "/v1/storage",
    summary="Read storage use per table",
    response_model=StorageBody,
    responses=_ERRORS,
)
async def get_storage(_key: OperatorKey, container: ContainerDep) -> Any:
    """Rows and bytes per location: each ingress partition (PostgreSQL) or the ingress
    table (SQLite), the event store, read models, pipeline and forget-me tables, a total.
    Every table is listed, so one that grows without an owner shows up."""
    report = await run_in_threadpool(container.storage)
    return report.to_wire()
