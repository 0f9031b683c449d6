"""``rule_compensations``: one row per ``loyalty rules apply --compensate`` run."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson
import sqlalchemy as sa

from loyalty.adapters.db import Database
from loyalty.adapters.tables import rule_compensations
from loyalty.application.compensation import Run


def _utc(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


class CompensationStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    def get(self, new_version: int) -> Run | None:
        c = rule_compensations.c
        with self._db.read() as conn:
            r = conn.execute(
                sa.select(rule_compensations).where(c.new_version == new_version)
            ).first()
        if r is None:
            return None
        return Run(
            new_version=int(r.new_version),
            old_version=int(r.old_version),
            since=_utc(r.since),
            until=_utc(r.until),
            state=r.state,
            receipt=None if r.receipt is None else dict(orjson.loads(r.receipt)),
        )

    def start(self, run: Run) -> Run:
        values = {
            "new_version": run.new_version,
            "old_version": run.old_version,
            "since": run.since,
            "until": run.until,
            "state": run.state,
            "started_at": datetime.now(UTC),
        }
        if self._db.backend == "postgresql":
            from sqlalchemy.dialects.postgresql import insert as pg_insert

            stmt: Any = pg_insert(rule_compensations).values(**values)
        else:
            from sqlalchemy.dialects.sqlite import insert as sqlite_insert

            stmt = sqlite_insert(rule_compensations).values(**values)
        with self._db.write() as conn:
            conn.execute(stmt.on_conflict_do_nothing())
        found = self.get(run.new_version)
        assert found is not None
        return found

    def finish(self, new_version: int, receipt: dict[str, Any], at: datetime) -> None:
        c = rule_compensations.c
        with self._db.write() as conn:
            conn.execute(
                rule_compensations.update()
                .where(c.new_version == new_version)
                .values(state="done", receipt=orjson.dumps(receipt).decode(), finished_at=at)
            )
