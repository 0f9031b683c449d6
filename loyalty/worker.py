"""Composition root of the pipeline worker (embedded in ``serve`` or standalone)."""

from __future__ import annotations

import sqlalchemy as sa
from eventsourcing.persistence import PersistenceError

from loyalty.adapters.db import Database, DatabaseUnavailable
from loyalty.adapters.event_store import event_store_env
from loyalty.adapters.ingress_log import create_ingress_log
from loyalty.adapters.pipeline_store import PipelineStore, ShardLeases
from loyalty.adapters.rules_store import RulesStore
from loyalty.application.accounts import Accounts, Members
from loyalty.application.pipeline import Pipeline, Worker

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
    members = members or Members(env=event_store_env(settings))
    return Pipeline(
        create_ingress_log(db),
        PipelineStore(db),
        RulesStore(db),
        Accounts(members),
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
