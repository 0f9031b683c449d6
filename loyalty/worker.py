"""Composition root of the pipeline worker and the read-model projection (embedded in
``serve`` or standalone)."""

from __future__ import annotations

import sqlalchemy as sa
from eventsourcing.persistence import PersistenceError

from loyalty.adapters.db import Database, DatabaseUnavailable
from loyalty.adapters.event_store import event_store_env, stream_loader, worker_env
from loyalty.adapters.ingress_log import create_ingress_log
from loyalty.adapters.pipeline_store import PipelineStore, ShardLeases
from loyalty.adapters.read_models import ReadModels
from loyalty.adapters.rules_store import RulesStore
from loyalty.application.accounts import Accounts, Members
from loyalty.application.pipeline import Pipeline, Worker
from loyalty.application.projections import MemberProjection, ProjectionWorker

RETRY_ERRORS: tuple[type[BaseException], ...] = (
    sa.exc.OperationalError,
    sa.exc.InterfaceError,
    sa.exc.TimeoutError,
    DatabaseUnavailable,
    PersistenceError,
)


def parse_shards(spec: str, shard_count: int) -> list[int]:
    """'0-7', '3', '0-3,8-11' or 'all' -> shard numbers (validated)."""
    if spec.strip() == "all":
        return list(range(shard_count))
    shards: set[int] = set()
    for part in spec.split(","):
        lo, _, hi = part.strip().partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            raise ValueError(f"bad shard range {part!r}: use N, N-M or all")
        first, last = int(lo), int(hi or lo)
        if first > last or last >= shard_count:
            raise ValueError(f"shards must lie in 0-{shard_count - 1}: {part!r}")
        shards.update(range(first, last + 1))
    return sorted(shards)


def build_pipeline(db: Database, members: Members | None = None) -> Pipeline:
    settings = db.settings
    members = members or Members(env=worker_env(settings))
    return Pipeline(
        create_ingress_log(db),
        PipelineStore(db),
        RulesStore(db),
        Accounts(members, lambda app: stream_loader(app.recorder)),
        chunk=settings.pipeline_chunk,
    )


def build_worker(db: Database, shards: list[int], members: Members | None = None) -> Worker:
    leases = ShardLeases(db)
    return Worker(
        build_pipeline(db, members),
        shards,
        window_seconds=db.settings.award_window_seconds,
        try_lease=leases.try_acquire,
        retry_errors=RETRY_ERRORS,
    )


# Lease key of the member projection: beyond any shard number (shard_count <= 1024), so
# it shares ShardLeases' mechanism (advisory lock / lock file) without colliding.
PROJECTION_LEASE = 1_000_001


def build_projection(db: Database, members: Members | None = None) -> MemberProjection:
    members = members or Members(env=event_store_env(db.settings))
    return MemberProjection(members, ReadModels(db))


class ProjectionLease:
    """The projection's lease: held from a successful ``try_acquire`` until ``release``
    or the end of the process. Keep a reference: the lock lives as long as this object."""

    def __init__(self, db: Database) -> None:
        self._leases = ShardLeases(db)

    def try_acquire(self) -> bool:
        return self._leases.try_acquire(PROJECTION_LEASE)

    def release(self) -> None:
        self._leases.release_all()


def projection_lease(db: Database) -> ProjectionLease:
    return ProjectionLease(db)


def build_projection_worker(
    db: Database,
    members: Members | None = None,
    *,
    poll_seconds: float = 0.2,
    batch_size: int = 500,
) -> ProjectionWorker:
    projection = build_projection(db, members)
    projection.batch_size = batch_size
    return ProjectionWorker(
        projection,
        try_lease=ProjectionLease(db).try_acquire,
        retry_errors=RETRY_ERRORS,
        poll_seconds=poll_seconds,
    )
