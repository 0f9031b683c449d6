"""The pending table (``pipeline_pending``): see ``loyalty.application.pending``.

Amounts are exact decimal text; only Python adds them. The pipeline's merge runs in the
checkpoint's transaction and locks the rows it changes first (PostgreSQL: ``FOR UPDATE``,
in user id order; SQLite: the write lock taken by ``BEGIN IMMEDIATE``), so a recording's
conditional delete (in the event insert's transaction, see ``event_recorder``) either
commits before the merge reads the row (the merge then starts a new row) or waits and
finds the row changed (its insert fails and is retried)."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.dialects import sqlite

from loyalty.adapters.db import Database, psycopg_connection
from loyalty.adapters.tables import pipeline_pending
from loyalty.application.accounts import StreamErased
from loyalty.application.erasure import ERASING
from loyalty.application.pending import Contribution, PendingRow, Position
from loyalty.domain import explain
from loyalty.domain.expiry import month_of
from loyalty.domain.member import Member
from loyalty.domain.rules import exact_sum

_IN_CHUNK = 500
_COLUMNS = (
    "user_id, shard, currency, rank_points, event_count, rule_version, upto_txid, upto_seq, "
    "since, rank_need, currency_months, explain, from_txid, from_seq"
)
NO_RANK_ABOVE = "Infinity"
NO_FENCE = 2**62
forget_markers = sa.table(
    "forget_markers",
    sa.column("member_id", sa.String),
    sa.column("state", sa.String),
    sa.column("seq", sa.BigInteger),
)


def _need(text: str | None) -> Decimal | None:
    return None if text is None else Decimal(text)


def _months(text: str | None) -> dict[str, Decimal] | None:
    """``currency_months`` (issue 19): exact pending currency per month earned."""
    if text is None:
        return None
    return {month: Decimal(value) for month, value in orjson.loads(text).items()}


def _months_text(months: dict[str, Decimal]) -> str:
    return orjson.dumps({m: f"{v:f}" for m, v in sorted(months.items()) if v}).decode()


def _merge_months(
    before: dict[str, Decimal] | None,
    before_currency: Decimal,
    since: datetime,
    added: Contribution,
) -> dict[str, Decimal]:
    """The row's months plus the contribution's (a row without months, stored before
    they were kept, counts as earned in the month of its ``since``; so does a
    contribution without them)."""
    months = dict(before) if before is not None else {}
    if before is None and before_currency:
        months[month_of(since)] = before_currency
    extra = added.months if added.months is not None else {month_of(since): added.currency}
    for month, value in extra.items():
        months[month] = exact_sum(months.get(month, Decimal(0)), value)
    return months


def _aware(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


def _row(r: Sequence[Any]) -> PendingRow:
    since = r[8]
    if isinstance(since, str):  # SQLite through the DB-API cursor
        since = datetime.fromisoformat(since)
    if since.tzinfo is None:  # SQLite keeps UTC without the offset
        since = since.replace(tzinfo=UTC)
    return PendingRow(
        user_id=r[0],
        shard=int(r[1]),
        currency=Decimal(r[2]),
        rank_points=Decimal(r[3]),
        event_count=int(r[4]),
        rule_version=int(r[5]),
        upto=(int(r[6]), int(r[7])),
        since=since,
        rank_need=_need(r[9]),
        months=_months(r[10]),
    )


def merge(
    db: Database,
    conn: sa.Connection,
    shard: int,
    end: Position,
    contributions: Sequence[Contribution],
    now: datetime,
    fence: int | None = None,
    start: Position | None = None,
) -> list[PendingRow]:
    """Add ``contributions`` to the pending rows inside ``conn``'s transaction (the
    checkpoint's). Returns the members to settle now: new rows (rank need unknown) and
    rows whose pending reaches the rank need.

    The erasure guard, as the event insert's: raises ``StreamErased`` (the transaction,
    checkpoint included, rolls back) if a contributing member is being erased, or was
    erased after the caller's erasure generation ``fence`` (its window may hold events
    of before the erasure)."""
    if not contributions:
        return []
    ids = sorted({c.user_id for c in contributions})
    versions = {c.user_id: c.rule_version for c in contributions}
    _guard(db, conn, ids, fence)
    existing: dict[
        str, tuple[Decimal, Decimal, int, Decimal | None, datetime, dict[str, Decimal] | None]
    ] = {}
    explained: dict[str, str | None] = {}
    if db.backend == "postgresql":
        rows = (
            psycopg_connection(conn)
            .execute(
                "SELECT user_id, currency, rank_points, event_count, rank_need, since, "
                "currency_months, explain, rule_version FROM pipeline_pending WHERE user_id IN "
                "(SELECT jsonb_array_elements_text(%s::text::jsonb)) ORDER BY user_id FOR UPDATE",
                (orjson.dumps(ids).decode(),),
            )
            .fetchall()
        )
    else:
        c = pipeline_pending.c
        rows = []
        for i in range(0, len(ids), _IN_CHUNK):
            rows += conn.execute(
                sa.select(
                    c.user_id,
                    c.currency,
                    c.rank_points,
                    c.event_count,
                    c.rank_need,
                    c.since,
                    c.currency_months,
                    c.explain,
                    c.rule_version,
                ).where(c.user_id.in_(ids[i : i + _IN_CHUNK]))
            ).all()
    for (
        user_id,
        currency_text,
        points_text,
        count_value,
        need_text,
        since_value,
        months,
        text,
        version,
    ) in rows:
        explained[user_id] = text
        existing[user_id] = (
            Decimal(currency_text),
            Decimal(points_text),
            int(count_value),
            # a need noted under another rules version (another ladder) is derived again
            _need(need_text) if int(version) == versions[user_id] else None,
            _aware(
                since_value
                if isinstance(since_value, datetime)
                else datetime.fromisoformat(since_value)
            ),
            _months(months),
        )
    out: list[tuple[str, str, str, int, int, str, str | None]] = []
    settle: list[PendingRow] = []
    for contribution in contributions:
        before = existing.get(contribution.user_id)
        need: Decimal | None = None
        nothing = not (contribution.currency or contribution.rank_points)
        if before is None and nothing:
            continue  # only capped or unknown events: no row to explain them in
        summary = contribution.summary
        if summary is not None and contribution.user_id in explained:
            summary = explain.merge(explain.loads(explained[contribution.user_id]), summary)
        if before is None:
            currency, points, count = contribution.currency, contribution.rank_points, 0
            since = now
            months = _merge_months({}, Decimal(0), now, contribution)
        else:
            currency = exact_sum(before[0], contribution.currency)
            points = exact_sum(before[1], contribution.rank_points)
            count, need, since = before[2], before[3], before[4]
            months = _merge_months(before[5], before[0], since, contribution)
        if need is None or points >= need:
            settle.append(
                PendingRow(
                    contribution.user_id,
                    shard,
                    currency,
                    points,
                    count + contribution.event_count,
                    contribution.rule_version,
                    end,
                    since,
                    need,
                    months,
                )
            )
        out.append(
            (
                contribution.user_id,
                f"{currency:f}",  # positional notation: SQL can cast it (leaderboard)
                f"{points:f}",
                count + contribution.event_count,
                contribution.rule_version,
                _months_text(months),
                None if summary is None else explain.dumps(summary),
            )
        )
    if not out:
        return settle
    first = start if start is not None else end
    if db.backend == "postgresql":
        psycopg_connection(conn).execute(
            f"INSERT INTO pipeline_pending ({_COLUMNS}) "
            "SELECT e->>0, %s, e->>1, e->>2, (e->>3)::bigint, (e->>4)::int, %s, %s, %s, NULL, "
            "e->>5, e->>6, %s, %s "
            "FROM jsonb_array_elements(%s::text::jsonb) AS e "
            "ON CONFLICT (user_id) DO UPDATE SET currency = excluded.currency, "
            "rank_points = excluded.rank_points, event_count = excluded.event_count, "
            "rule_version = excluded.rule_version, upto_txid = excluded.upto_txid, "
            "upto_seq = excluded.upto_seq, currency_months = excluded.currency_months, "
            "explain = excluded.explain, rank_need = CASE WHEN "
            "pipeline_pending.rule_version = excluded.rule_version "
            "THEN pipeline_pending.rank_need END",
            (shard, end[0], end[1], now, first[0], first[1], orjson.dumps(out).decode()),
        )
    else:
        stmt = sqlite.insert(pipeline_pending)
        stmt = stmt.on_conflict_do_update(
            index_elements=["user_id"],
            set_={
                name: getattr(stmt.excluded, name)
                for name in (
                    "currency",
                    "rank_points",
                    "event_count",
                    "rule_version",
                    "upto_txid",
                    "upto_seq",
                    "currency_months",
                    "explain",
                )
            }
            | {  # a need noted under another rules version is derived again
                "rank_need": sa.case(
                    (
                        pipeline_pending.c.rule_version == stmt.excluded.rule_version,
                        pipeline_pending.c.rank_need,
                    ),
                    else_=sa.null(),
                )
            },
        )
        conn.execute(
            stmt,
            [
                {
                    "user_id": u,
                    "shard": shard,
                    "currency": cur,
                    "rank_points": pts,
                    "event_count": n,
                    "rule_version": v,
                    "upto_txid": end[0],
                    "upto_seq": end[1],
                    "since": now,
                    "rank_need": None,
                    "currency_months": months_text,
                    "explain": why,
                    "from_txid": first[0],
                    "from_seq": first[1],
                }
                for u, cur, pts, n, v, months_text, why in out
            ],
        )
    return settle


def _guard(db: Database, conn: sa.Connection, user_ids: Sequence[str], fence: int | None) -> None:
    by_member = {str(Member.create_id(u)): u for u in user_ids}
    members = sorted(by_member)
    limit = NO_FENCE if fence is None else fence
    found: list[tuple[str, str]] = []
    for i in range(0, len(members), _IN_CHUNK):
        m = forget_markers.c
        found += [
            (r[0], r[1])
            for r in conn.execute(
                sa.select(m.member_id, m.state).where(
                    m.member_id.in_(members[i : i + _IN_CHUNK]),
                    sa.or_(m.state == ERASING, m.seq > limit),
                )
            )
        ]
    if found:
        reason = "erasing" if any(state == ERASING for _, state in found) else "fenced"
        raise StreamErased(reason, sorted(member for member, _ in found))


class PendingTable:
    """Reads and small writes of ``pipeline_pending`` outside the pipeline's merge."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def load(self, user_ids: Iterable[str]) -> dict[str, PendingRow]:
        ids = sorted(set(user_ids))
        found: dict[str, PendingRow] = {}
        c = pipeline_pending.c
        columns: list[sa.ColumnClause[Any]] = [
            sa.column(name.strip()) for name in _COLUMNS.split(",")
        ]
        with self._db.read() as conn:
            for i in range(0, len(ids), _IN_CHUNK):
                rows = conn.execute(
                    sa.select(*columns)
                    .select_from(pipeline_pending)
                    .where(c.user_id.in_(ids[i : i + _IN_CHUNK]))
                ).all()
                for r in rows:
                    found[r[0]] = _row(r)
        return found

    def unsettled(self, shards: Collection[int], limit: int) -> list[PendingRow]:
        """Rows of ``shards`` never settled (rank need unknown: a new member's first row,
        or one grown under a new rules version), at most ``limit``: what a worker killed
        between a window's commit and its settling left behind."""
        if not shards:
            return []
        c = pipeline_pending.c
        columns: list[sa.ColumnClause[Any]] = [
            sa.column(name.strip()) for name in _COLUMNS.split(",")
        ]
        with self._db.read() as conn:
            rows = conn.execute(
                sa.select(*columns)
                .select_from(pipeline_pending)
                .where(c.shard.in_(sorted(shards)), c.rank_need.is_(None))
                .order_by(c.user_id)
                .limit(limit)
            ).all()
        return [_row(r) for r in rows]

    def due(self, shards: Collection[int], before: datetime, limit: int) -> list[str]:
        """Members of ``shards`` whose oldest pending contribution is older than
        ``before`` (oldest first, at most ``limit``)."""
        if not shards:
            return []
        c = pipeline_pending.c
        with self._db.read() as conn:
            return [
                r[0]
                for r in conn.execute(
                    sa.select(c.user_id)
                    .where(c.shard.in_(sorted(shards)), c.since < before)
                    .order_by(c.since)
                    .limit(limit)
                )
            ]

    def set_needs(self, needs: Sequence[tuple[str, Position, Decimal | None]]) -> None:
        """Store the rank need of each row still at its revision (others: nothing), in
        one transaction."""
        if not needs:
            return
        c = pipeline_pending.c
        statement = (
            pipeline_pending.update()
            .where(
                c.user_id == sa.bindparam("u"),
                c.upto_txid == sa.bindparam("t"),
                c.upto_seq == sa.bindparam("s"),
            )
            .values(rank_need=sa.bindparam("n"))
        )
        with self._db.write() as conn:
            conn.execute(
                statement,
                [
                    {
                        "u": user_id,
                        "t": upto[0],
                        "s": upto[1],
                        "n": NO_RANK_ABOVE if need is None else f"{need:f}",
                    }
                    for user_id, upto, need in sorted(needs, key=lambda n: n[0])
                ],
            )

    def discard(self, user_id: str, upto: Position) -> bool:
        """Delete a row still at revision ``upto`` that is already recorded."""
        c = pipeline_pending.c
        with self._db.write() as conn:
            return (
                conn.execute(
                    pipeline_pending.delete().where(
                        c.user_id == user_id, c.upto_txid == upto[0], c.upto_seq == upto[1]
                    )
                ).rowcount
                == 1
            )

    def count(self) -> int:
        with self._db.read() as conn:
            return int(
                conn.execute(sa.select(sa.func.count()).select_from(pipeline_pending)).one()[0]
            )
