"""``rule_compensations``: one row per ``loyalty rules apply --compensate`` run; and the
compensations' explanations (``award_explanations``), written only while the member's
stream exists."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import orjson
import sqlalchemy as sa

from loyalty.adapters.db import Database
from loyalty.adapters.explanation_store import stored_values
from loyalty.adapters.tables import award_explanations, rule_compensations
from loyalty.application.compensation import (
    ABANDONED,
    COMPENSATION_PREFIX,
    DONE,
    RUNNING,
    Run,
)
from loyalty.application.explain import StoredExplanation
from loyalty.domain.member import Member


def _utc(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _run(r: Any) -> Run:
    return Run(
        new_version=int(r.new_version),
        old_version=int(r.old_version),
        since=_utc(r.since),
        until=_utc(r.until),
        state=r.state,
        receipt=None if r.receipt is None else dict(orjson.loads(r.receipt)),
    )


class CompensationStore:
    def __init__(self, db: Database) -> None:
        self._db = db
        self._pg = db.backend == "postgresql"

    def get(self, new_version: int) -> Run | None:
        c = rule_compensations.c
        with self._db.read() as conn:
            r = conn.execute(
                sa.select(rule_compensations).where(c.new_version == new_version)
            ).first()
        return None if r is None else _run(r)

    def unfinished(self) -> list[Run]:
        c = rule_compensations.c
        with self._db.read() as conn:
            rows = conn.execute(
                sa.select(rule_compensations).where(c.state == RUNNING).order_by(c.new_version)
            ).all()
        return [_run(r) for r in rows]

    def unfinished_summary(self) -> list[dict[str, Any]]:
        """Unfinished runs for ``loyalty doctor``: versions and times, no user id."""
        c = rule_compensations.c
        with self._db.read() as conn:
            rows = conn.execute(
                sa.select(c.new_version, c.old_version, c.since, c.started_at)
                .where(c.state == RUNNING)
                .order_by(c.new_version)
            ).all()
        return [
            {
                "new_version": int(r[0]),
                "old_version": int(r[1]),
                "since": _utc(r[2]).isoformat(),
                "started_at": _utc(r[3]).isoformat(),
            }
            for r in rows
        ]

    def start(self, run: Run) -> Run:
        values = {
            "new_version": run.new_version,
            "old_version": run.old_version,
            "since": run.since,
            "until": run.until,
            "state": run.state,
            "started_at": datetime.now(UTC),
        }
        if self._pg:
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

    def _end(self, new_version: int, state: str, receipt: dict[str, Any], at: datetime) -> bool:
        c = rule_compensations.c
        with self._db.write() as conn:
            return (
                conn.execute(
                    rule_compensations.update()
                    .where(c.new_version == new_version, c.state == RUNNING)
                    .values(state=state, receipt=orjson.dumps(receipt).decode(), finished_at=at)
                ).rowcount
                == 1
            )

    def finish(self, new_version: int, receipt: dict[str, Any], at: datetime) -> None:
        self._end(new_version, DONE, receipt, at)

    def abandon(self, new_version: int, receipt: dict[str, Any], at: datetime) -> bool:
        return self._end(new_version, ABANDONED, receipt, at)

    def compensated(self, new_version: int) -> int:
        c = award_explanations.c
        with self._db.read() as conn:
            return int(
                conn.execute(
                    sa.select(sa.func.count())
                    .select_from(award_explanations)
                    .where(
                        c.award_id == f"{COMPENSATION_PREFIX}{new_version}",
                        c.kind == "compensation",
                    )
                ).scalar_one()
            )

    def put_explanation(self, row: StoredExplanation) -> bool:
        """Store (or leave as is: the same id always holds the same explanation) a
        compensation's explanation, only if the member's stream exists: checked in the
        insert's transaction with a lock the erasure's DELETE of the stream conflicts
        with (PostgreSQL: ``FOR KEY SHARE`` on the stream's first event; SQLite: the
        write lock). Forget-me deletes explanations after the stream, so either the
        insert sees the stream gone, or the erasure deletes the row after it."""
        member_id = Member.create_id(row.user_id)
        values = stored_values(row)
        with self._db.write() as conn:
            if self._pg:
                from sqlalchemy.dialects.postgresql import insert as pg_insert

                exists = conn.execute(
                    sa.text(
                        "SELECT 1 FROM members_events WHERE originator_id = :m "
                        "AND originator_version = 1 FOR KEY SHARE"
                    ),
                    {"m": member_id},
                ).first()
                stmt: Any = pg_insert(award_explanations).values(**values)
            else:
                from sqlalchemy.dialects.sqlite import insert as sqlite_insert

                exists = conn.execute(
                    sa.text(
                        "SELECT 1 FROM stored_events WHERE originator_id = :m "
                        "AND originator_version = 1"
                    ),
                    {"m": uuid.UUID(str(member_id)).hex},
                ).first()
                stmt = sqlite_insert(award_explanations).values(**values)
            if exists is None:
                return False
            conn.execute(stmt.on_conflict_do_nothing())
        return True
