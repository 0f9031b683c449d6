"""Retention with the ingress log on NATS JetStream (issue 31, item 7).

The stream's messages expire by its ``max_age`` (JetStream removes whole blocks: no
deletes, no scavenging here). What this store does per run:

- *hold*: if the oldest message the pipeline has not processed would reach ``max_age``
  (the retention window plus a day), ``max_age`` is raised past it (plus a day) and an
  error is logged on every run until the pipeline has caught up, when it is set back: a
  day still unprocessed is never lost while retention runs (the worker runs it hourly by
  default; the margin is a day). Workers all down for longer than ``max_age`` is the
  case it cannot cover (docs/deployment.md).
- *keys*: the de-duplication keys of an expired day (``stream_ingress_keys``) are
  deleted when every key of the day is at or below its shard's checkpoint; a day with an
  unprocessed event keeps its keys (and its cap counters) and is reported kept.
- the rest (cap counters, forget markers, the database's own unused ingress storage) is
  the database's retention store's.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from datetime import UTC, date, datetime

import sqlalchemy as sa

from loyalty.adapters.db import Database
from loyalty.adapters.nats_log import JetStreamIngressLog
from loyalty.adapters.pipeline_store import PipelineStore
from loyalty.adapters.retention_store import PostgresRetentionStore, SqliteRetentionStore
from loyalty.adapters.tables import stream_ingress_keys
from loyalty.application.retention import DayOutcome


class JetStreamRetentionStore:
    def __init__(
        self,
        db: Database,
        stream: JetStreamIngressLog,
        inner: PostgresRetentionStore | SqliteRetentionStore,
    ) -> None:
        self._db = db
        self._stream = stream
        self._inner = inner
        self.backend = f"{inner.backend}+jetstream"
        self._kept: set[date] = set()
        self._inner_days: set[date] = set()

    def lease(self) -> AbstractContextManager[bool]:
        return self._inner.lease()

    def ensure_days(self, days: set[date]) -> None:
        self._inner.ensure_days(days)

    def hold(self, now: datetime) -> None:
        positions = PipelineStore(self._db).positions()
        _pending, oldest = self._stream.pending_stats(positions)
        self._stream.hold(oldest, now)

    def expired_days(self, cutoff: date) -> list[date]:
        self.hold(datetime.now(UTC))
        k = stream_ingress_keys.c
        with self._db.read() as conn:
            days = set(conn.execute(sa.select(k.day).where(k.day < cutoff).distinct()).scalars())
        inner = self._inner.expired_days(cutoff)  # in the database store's order (a
        self._inner_days = set(inner)  # half-detached day first: it blocks the others)
        return inner + sorted(days - self._inner_days)

    def _unprocessed(self, day: date) -> int:
        positions = PipelineStore(self._db).positions()
        k = stream_ingress_keys.c
        with self._db.read() as conn:
            rows = conn.execute(
                sa.select(k.shard, sa.func.max(k.seq), sa.func.count())
                .where(k.day == day)
                .group_by(k.shard)
            ).all()
            behind = 0
            for shard, top, _count in rows:
                at = positions.get(int(shard), (0, 0))[1]
                if top is not None and int(top) > at:
                    behind += int(
                        conn.execute(
                            sa.select(sa.func.count()).where(
                                k.day == day, k.shard == shard, k.seq > at
                            )
                        ).scalar_one()
                    )
        return behind

    def expire_day(self, day: date) -> DayOutcome:
        inner = self._inner.expire_day(day) if day in self._inner_days else None
        unprocessed = self._unprocessed(day)
        if unprocessed:
            self._kept.add(day)
            return DayOutcome(0, 0, unprocessed, False)
        with self._db.write() as conn:
            removed = int(
                conn.execute(
                    stream_ingress_keys.delete().where(stream_ingress_keys.c.day == day)
                ).rowcount
            )
        if inner is not None:
            return DayOutcome(
                inner.removed_rows, inner.bytes, inner.unprocessed_rows, inner.removed
            )
        return DayOutcome(removed, 0, 0, True)

    def unrolled_rows(self, day: date) -> int:
        return self._inner.unrolled_rows(day)

    def delete_caps_before(self, day: date) -> tuple[int, int]:
        # a kept day keeps its cap counters: the pipeline still needs them
        return self._inner.delete_caps_before(min([day, *self._kept]))

    def delete_expired_markers(self, as_of: datetime) -> int:
        return self._inner.delete_expired_markers(as_of)

    def expire_keys(self, cutoff: date) -> int:
        return 0  # stream_ingress_keys go with their day (expire_day)

    def finish(self) -> int:
        self._kept.clear()
        return self._inner.finish()
