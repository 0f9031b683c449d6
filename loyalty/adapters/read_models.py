"""Read models of member accounts (balances, statement history, leaderboard) and the
tracking position of the projection that writes them.

A batch's row changes and its new tracking position are committed in one transaction,
and only if the tracking row still holds the position the batch was read after (the
UPDATE of that row comes first, so on PostgreSQL a second runner waits on its row lock
and then finds the position moved). Every table is keyed by user_id.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from loyalty.adapters.db import Database
from loyalty.adapters.explanation_store import erase_explanations
from loyalty.adapters.rollup_store import RollupStore
from loyalty.adapters.tables import (
    Timestamp,
    member_balances,
    member_history,
    member_lots,
    member_ranks,
    metadata,
    pipeline_pending,
    projection_tracking,
)
from loyalty.application.projections import HistoryEntry, ProjectedBatch, QuarantinedEvent
from loyalty.application.reporting import forgotten_day
from loyalty.domain.member import Member

_IN_CHUNK = 500

# Events a projection passed over (see ``loyalty.application.projections``); erased by
# forget-me with the stream (it holds the stream id).
projection_quarantine = sa.Table(
    "projection_quarantine",
    metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("position", sa.BigInteger, primary_key=True),
    sa.Column("member_id", sa.String(36), nullable=False),
    sa.Column("originator_version", sa.BigInteger, nullable=False),
    sa.Column("topic", sa.Text, nullable=False),
    sa.Column("error", sa.Text, nullable=False),
    sa.Column("quarantined_at", Timestamp, nullable=False),
    sa.Index("projection_quarantine_member_idx", "member_id"),
)


@dataclass(frozen=True, slots=True)
class QuarantineEntry:
    name: str
    event: QuarantinedEvent
    quarantined_at: datetime


class _TrackingMoved(Exception):
    pass


@dataclass(frozen=True, slots=True)
class LeaderboardRow:
    user_id: str
    rank_points: int


@dataclass(frozen=True, slots=True)
class MemberRow:
    """A member as the console's member list shows it (the projected balance)."""

    user_id: str
    currency: int
    rank_points: int
    updated_at: datetime


MEMBER_ORDERS = ("id", "recent", "top")
"""How a member list is ordered: by user id (a prefix search), most recently changed
first, most rank points first (ties by user id)."""


def _utc(value: datetime) -> datetime:
    """SQLite gives naive datetimes back; every stored time is UTC."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class ReadModels:
    def __init__(self, db: Database) -> None:
        self._db = db
        self._rollups = RollupStore(db)

    def rank_points_of(self, user_ids: Sequence[str]) -> dict[str, int]:
        """Recorded rank points of ``user_ids`` (members without a balance row: absent)."""
        b = member_balances.c
        found: dict[str, int] = {}
        ids = list(user_ids)
        with self._db.read() as conn:
            for i in range(0, len(ids), 500):
                for user_id, points in conn.execute(
                    sa.select(b.user_id, b.rank_points).where(b.user_id.in_(ids[i : i + 500]))
                ):
                    found[user_id] = int(points)
        return found

    # ------------------------------------------------------------ projection side

    def position(self, name: str) -> int:
        t = projection_tracking.c
        with self._db.read() as conn:
            found = conn.execute(sa.select(t.position).where(t.name == name)).scalar()
        if found is not None:
            return int(found)
        insert = postgresql.insert if self._db.backend == "postgresql" else sqlite.insert
        with self._db.write() as conn:
            conn.execute(
                insert(projection_tracking).values(name=name, position=0).on_conflict_do_nothing()
            )
            return int(conn.execute(sa.select(t.position).where(t.name == name)).scalar_one())

    def epoch(self, name: str) -> int:
        t = projection_tracking.c
        with self._db.read() as conn:
            found = conn.execute(sa.select(t.epoch).where(t.name == name)).scalar()
        return int(found or 0)

    def user_ids(self, member_ids: Collection[str]) -> Mapping[str, str]:
        wanted = sorted(member_ids)
        b = member_balances.c
        found: dict[str, str] = {}
        with self._db.read() as conn:
            for i in range(0, len(wanted), _IN_CHUNK):
                rows = conn.execute(
                    sa.select(b.member_id, b.user_id).where(
                        b.member_id.in_(wanted[i : i + _IN_CHUNK])
                    )
                )
                found.update({str(m): str(u) for m, u in rows})
        return found

    def apply(self, name: str, batch: ProjectedBatch) -> bool:
        """Commit the batch's rows and tracking position together; False (nothing
        written) when the tracking position is no longer ``batch.start``."""
        t = projection_tracking.c
        b = member_balances.c
        try:
            with self._db.write() as conn:
                moved = conn.execute(
                    projection_tracking.update()
                    .where(t.name == name, t.position == batch.start, t.epoch == batch.epoch)
                    .values(position=batch.end)
                )
                if moved.rowcount != 1:
                    raise _TrackingMoved()
                # before the balance rows change: the rollup counts from them
                self._rollups.apply_accounts(conn, batch.facts, batch.end)
                if batch.quarantined:
                    now = datetime.now(UTC)
                    conn.execute(
                        projection_quarantine.insert(),
                        [
                            {
                                "name": name,
                                "position": q.position,
                                "member_id": q.member_id,
                                "originator_version": q.originator_version,
                                "topic": q.topic,
                                "error": q.error[:2000],
                                "quarantined_at": now,
                            }
                            for q in batch.quarantined
                        ],
                    )
                new_rows = [self._balance_row(c) for c in batch.balances.values() if c.created]
                if new_rows:
                    conn.execute(member_balances.insert(), new_rows)
                deltas = [
                    {
                        "b_user_id": c.user_id,
                        "b_currency": c.currency,
                        "b_rank_points": c.rank_points,
                        "b_lifetime": c.lifetime_currency,
                        "b_updated_at": c.updated_at,
                    }
                    for c in batch.balances.values()
                    if not c.created
                ]
                if deltas:
                    conn.execute(
                        member_balances.update()
                        .where(b.user_id == sa.bindparam("b_user_id"))
                        .values(
                            currency=b.currency + sa.bindparam("b_currency"),
                            rank_points=b.rank_points + sa.bindparam("b_rank_points"),
                            lifetime_currency=b.lifetime_currency + sa.bindparam("b_lifetime"),
                            updated_at=sa.bindparam("b_updated_at"),
                        ),
                        deltas,
                    )
                if batch.history:
                    conn.execute(
                        member_history.insert(),
                        [
                            {
                                "user_id": h.user_id,
                                "position": h.position,
                                "kind": h.kind,
                                "currency": h.currency,
                                "rank_points": h.rank_points,
                                "at": h.at,
                                "ref": h.ref,
                                "reason": h.reason,
                            }
                            for h in batch.history
                        ],
                    )
                self._apply_lots(conn, batch.lots)
                self._apply_ranks(conn, batch.ranks)
        except _TrackingMoved:
            return False
        return True

    def _apply_ranks(self, conn: sa.Connection, ranks: Mapping[str, str | None]) -> None:
        """Ranked members and their rank (no rank: no row)."""
        if not ranks:
            return
        c = member_ranks.c
        conn.execute(
            member_ranks.delete().where(c.user_id == sa.bindparam("u")),
            [{"u": user} for user in ranks],
        )
        rows = [{"user_id": user, "rank": rank} for user, rank in ranks.items() if rank]
        if rows:
            conn.execute(member_ranks.insert(), rows)

    def _apply_lots(self, conn: sa.Connection, lots: Mapping[tuple[str, str], bool]) -> None:
        """The expiry index: lots credited in (idempotent), lots expired out."""
        opened = [{"user_id": u, "lot": lot} for (u, lot), is_open in lots.items() if is_open]
        closed = [{"u": u, "l": lot} for (u, lot), is_open in lots.items() if not is_open]
        if opened:
            insert = (
                postgresql.insert(member_lots)
                if self._db.backend == "postgresql"
                else sqlite.insert(member_lots)
            )
            conn.execute(insert.on_conflict_do_nothing(), opened)
        if closed:
            c = member_lots.c
            conn.execute(
                member_lots.delete().where(
                    c.user_id == sa.bindparam("u"), c.lot == sa.bindparam("l")
                ),
                closed,
            )

    @staticmethod
    def _balance_row(change: Any) -> dict[str, Any]:
        return {
            "user_id": change.user_id,
            "member_id": change.member_id,
            "currency": change.currency,
            "rank_points": change.rank_points,
            "lifetime_currency": change.lifetime_currency,
            "updated_at": change.updated_at,
        }

    def reset(self, name: str) -> None:
        """Empty the read models and set the tracking position to 0, atomically."""
        with self._db.write() as conn:
            if self._db.backend == "postgresql":
                conn.execute(
                    sa.text("TRUNCATE member_history, member_balances, member_lots, member_ranks")
                )
            else:
                conn.execute(member_lots.delete())
                conn.execute(member_ranks.delete())
                conn.execute(member_history.delete())
                conn.execute(member_balances.delete())
            conn.execute(projection_tracking.delete().where(projection_tracking.c.name == name))
            conn.execute(projection_tracking.insert().values(name=name, position=0))
            conn.execute(projection_quarantine.delete().where(projection_quarantine.c.name == name))

    # ------------------------------------------------------------------ quarantine

    def quarantined_count(self, name: str | None = None) -> int:
        q = projection_quarantine.c
        query = sa.select(sa.func.count()).select_from(projection_quarantine)
        if name is not None:
            query = query.where(q.name == name)
        with self._db.read() as conn:
            return int(conn.execute(query).scalar_one())

    def quarantined(self, limit: int = 1000) -> list[QuarantineEntry]:
        """Quarantined events, oldest position first."""
        q = projection_quarantine.c
        with self._db.read() as conn:
            rows = conn.execute(
                sa.select(projection_quarantine).order_by(q.name, q.position).limit(limit)
            ).all()
        return [
            QuarantineEntry(
                r.name,
                QuarantinedEvent(
                    int(r.position), r.member_id, int(r.originator_version), r.topic, r.error
                ),
                _utc(r.quarantined_at),
            )
            for r in rows
        ]

    def release_quarantined(self, member_ids: Collection[str]) -> int:
        """Delete the quarantine entries of these streams (after they were repaired)."""
        q = projection_quarantine.c
        deleted = 0
        wanted = sorted(member_ids)
        with self._db.write() as conn:
            for i in range(0, len(wanted), _IN_CHUNK):
                deleted += conn.execute(
                    projection_quarantine.delete().where(q.member_id.in_(wanted[i : i + _IN_CHUNK]))
                ).rowcount
        return deleted

    # ---------------------------------------------------------------- query side

    def has_member(self, user_id: str) -> bool:
        b = member_balances.c
        with self._db.read() as conn:
            return (
                conn.execute(sa.select(b.user_id).where(b.user_id == user_id)).first() is not None
            )

    def history(self, user_id: str, limit: int, before: int | None = None) -> list[HistoryEntry]:
        """A member's statement entries, newest first, older than position ``before``."""
        h = member_history.c
        query = (
            sa.select(
                h.user_id, h.position, h.kind, h.currency, h.rank_points, h.at, h.ref, h.reason
            )
            .where(h.user_id == user_id)
            .order_by(h.position.desc())
            .limit(limit)
        )
        if before is not None:
            query = query.where(h.position < before)
        with self._db.read() as conn:
            rows = conn.execute(query).all()
        return [
            HistoryEntry(r[0], int(r[1]), r[2], int(r[3]), int(r[4]), _utc(r[5]), r[6], r[7])
            for r in rows
        ]

    def find_members(
        self,
        order: str,
        limit: int,
        prefix: str = "",
        after: MemberRow | None = None,
    ) -> list[MemberRow]:
        """Up to ``limit`` members (from ``member_balances``) whose user id starts with
        ``prefix``, in ``order`` (:data:`MEMBER_ORDERS`), after the row ``after`` (keyset
        paging on an index: the user id, ``member_balances_recent_idx`` or the
        leaderboard's; never an OFFSET)."""
        b = member_balances.c
        query = sa.select(b.user_id, b.currency, b.rank_points, b.updated_at)
        if prefix:
            # exact on both backends (SQLite's LIKE ignores case); the lower bound lets
            # the primary key's index start at the prefix
            starts = sa.func.substr(b.user_id, 1, len(prefix)) == prefix
            query = query.where(b.user_id >= prefix, starts)
        if order == "recent":
            if after is not None:
                query = query.where(
                    sa.or_(
                        b.updated_at < after.updated_at,
                        sa.and_(b.updated_at == after.updated_at, b.user_id > after.user_id),
                    )
                )
            query = query.order_by(b.updated_at.desc(), b.user_id)
        elif order == "top":
            if after is not None:
                query = query.where(
                    sa.or_(
                        b.rank_points < after.rank_points,
                        sa.and_(b.rank_points == after.rank_points, b.user_id > after.user_id),
                    )
                )
            query = query.order_by(b.rank_points.desc(), b.user_id)
        else:
            if after is not None:
                query = query.where(b.user_id > after.user_id)
            query = query.order_by(b.user_id)
        with self._db.read() as conn:
            rows = conn.execute(query.limit(limit)).all()
        return [MemberRow(r[0], int(r[1]), int(r[2]), _utc(r[3])) for r in rows]

    def totals_since(self, since: datetime) -> dict[str, int]:
        """Currency per history kind (award, spend, refund, adjustment) recorded at or
        after ``since``: what the console's dashboard shows for today."""
        h = member_history.c
        query = (
            sa.select(h.kind, sa.func.coalesce(sa.func.sum(h.currency), 0))
            .where(h.at >= since)
            .group_by(h.kind)
        )
        with self._db.read() as conn:
            return {str(r[0]): int(r[1]) for r in conn.execute(query).all()}

    def outstanding_currency(self) -> tuple[int, int]:
        """(members, currency held by all of them) as projected."""
        b = member_balances.c
        query = sa.select(sa.func.count(), sa.func.coalesce(sa.func.sum(b.currency), 0))
        with self._db.read() as conn:
            row = conn.execute(query).one()
        return int(row[0]), int(row[1])

    def leaderboard(self, limit: int) -> list[LeaderboardRow]:
        """Members by rank points including the whole points of their pending earnings
        (``pipeline_pending``; the carried fraction below one point, which only the
        account holds, is left out), highest first; ties by user id."""
        b = member_balances.c
        p = pipeline_pending.c
        whole = (
            sa.func.floor(sa.cast(p.rank_points, sa.Numeric))
            if self._db.backend == "postgresql"
            else sa.cast(p.rank_points, sa.Integer)  # text -> integer truncates: floor for >= 0
        )
        points = (b.rank_points + sa.func.coalesce(whole, 0)).label("points")
        query = (
            sa.select(b.user_id, points)
            .select_from(member_balances.outerjoin(pipeline_pending, p.user_id == b.user_id))
            .order_by(points.desc(), b.user_id)
        )
        with self._db.read() as conn:
            rows = conn.execute(query.limit(limit)).all()
        return [LeaderboardRow(r[0], int(r[1])) for r in rows]

    def snapshot(self) -> dict[str, list[tuple[Any, ...]]]:
        """Every row of the read models, sorted (for comparing with a rebuild)."""
        with self._db.read() as conn:
            balances = conn.execute(
                sa.select(member_balances).order_by(member_balances.c.user_id)
            ).all()
            history = conn.execute(
                sa.select(member_history).order_by(
                    member_history.c.user_id, member_history.c.position
                )
            ).all()
        return {
            "member_balances": [(*r[:-1], _utc(r[-1])) for r in balances],
            "member_history": [(*r[:5], _utc(r[5]), *r[6:]) for r in history],
        }


def erase_member(db: Database, user_id: str) -> dict[str, int]:
    """Forget-me: delete the member's read model rows, quarantined events and award
    explanations, and take the member out of today's account figures, in one
    transaction; every projection batch read before it is invalidated."""
    member_id = str(Member.create_id(user_id))
    with db.write() as conn:
        quarantined = conn.execute(
            sa.text("DELETE FROM projection_quarantine WHERE member_id = :m"), {"m": member_id}
        ).rowcount
        # Invalidate every projection batch read before now (see the projection).
        conn.execute(sa.text("UPDATE projection_tracking SET epoch = epoch + 1"))
        _forget_in_rollups(db, conn, user_id)
        history = conn.execute(
            sa.text("DELETE FROM member_history WHERE user_id = :u"), {"u": user_id}
        ).rowcount
        lots = conn.execute(
            sa.text("DELETE FROM member_lots WHERE user_id = :u"), {"u": user_id}
        ).rowcount
        ranks = conn.execute(
            sa.text("DELETE FROM member_ranks WHERE user_id = :u"), {"u": user_id}
        ).rowcount
        balances = conn.execute(
            sa.text("DELETE FROM member_balances WHERE user_id = :u"), {"u": user_id}
        ).rowcount
        # after the stream (step event_store): no insert can add one any more
        explanations = erase_explanations(conn, user_id)
    return {
        "award_explanations": explanations,
        "member_history": int(history),
        "member_balances": int(balances),
        "member_lots": int(lots),
        "member_ranks": int(ranks),
        "projection_quarantine": int(quarantined),
    }


def _forget_in_rollups(db: Database, conn: sa.Connection, user_id: str) -> None:
    """Take the member's projected balance, account and rank out of today's account
    figures (counts only: the rollups never hold a member), in the transaction that
    deletes the rows they were counted from."""
    balance = conn.execute(
        sa.text("SELECT currency FROM member_balances WHERE user_id = :u"), {"u": user_id}
    ).scalar()
    if balance is None:
        return
    rank = conn.execute(
        sa.text(
            "SELECT ref FROM member_history WHERE user_id = :u AND kind = 'rank_changed' "
            "ORDER BY position DESC LIMIT 1"
        ),
        {"u": user_id},
    ).scalar()
    RollupStore(db).add_days(conn, {datetime.now(UTC).date(): forgotten_day(int(balance), rank)})
