"""The pending table (``pipeline_pending``): see ``loyalty.application.pending``.

Amounts are exact decimal text; only Python adds them. The pipeline's merge runs in the
checkpoint's transaction and locks the rows it changes first (PostgreSQL: ``FOR UPDATE``,
in user id order; SQLite: the write lock taken by ``BEGIN IMMEDIATE``), so a recording's
conditional delete (in the event insert's transaction, see ``event_recorder``) either
commits before the merge reads the row (the merge then starts a new row) or waits and
finds the row changed (its insert fails and is retried)."""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import orjson
import psycopg
import sqlalchemy as sa
from psycopg.rows import tuple_row
from sqlalchemy.dialects import sqlite

from loyalty.adapters.db import Database, psycopg_connection
from loyalty.adapters.tables import forget_markers, pipeline_pending
from loyalty.application.accounts import StreamErased
from loyalty.application.erasure import ERASING
from loyalty.domain import explain
from loyalty.domain.member import Member
from loyalty.domain.pending import Contribution, Held, PendingRow, Position, accumulate

_IN_CHUNK = 500
_COLUMNS = (
    "user_id, shard, currency, rank_points, event_count, rule_version, upto_txid, upto_seq, "
    "since, rank_need, currency_months, explain, from_txid, from_seq"
)
# PostgreSQL looks rows up by a JSON array of keys ``e`` with ``CROSS JOIN LATERAL`` and a
# subquery per key ending in ``LIMIT 1`` (never pulled up into a join): each key is one
# probe of the primary key whatever the statistics say. A plain join of the array with
# the table was planned as a hash join over a sequential scan while the table was small,
# and a pooled connection's cached generic plan kept it as the table grew: at 40k pending
# rows a save's explanations took 15 ms (80 us a row), the delete of its rows 6 ms.
PENDING_AT_REVISION = (
    "SELECT {} FROM pipeline_pending q WHERE q.user_id = e->>0 "
    "AND q.upto_txid = (e->>1)::bigint AND q.upto_seq = (e->>2)::bigint LIMIT 1"
)
"""The pending row at the revision ``e`` names (``[user_id, upto_txid, upto_seq, ...]``)
for ``CROSS JOIN LATERAL``; ``{}``: the columns."""
LOCK_PENDING = (
    "SELECT q.* FROM jsonb_array_elements_text(%s::text::jsonb) AS u(id) "
    f"CROSS JOIN LATERAL (SELECT {_COLUMNS} FROM pipeline_pending "
    "WHERE user_id = u.id LIMIT 1 FOR UPDATE) q"
)
"""The rows of a JSON array of user ids, locked in the array's order (PostgreSQL)."""
SET_NEEDS = (
    "UPDATE pipeline_pending p SET rank_need = e->>3 "
    "FROM jsonb_array_elements(%s::text::jsonb) AS e "
    f"CROSS JOIN LATERAL ({PENDING_AT_REVISION.format('ctid')}) r "
    "WHERE p.ctid = r.ctid"
)
"""Each row's rank need (``e->>3``), only at the revision given (PostgreSQL)."""
DUE = (
    "SELECT d.user_id FROM unnest(%s::int[]) AS s(shard) CROSS JOIN LATERAL "
    "(SELECT user_id FROM pipeline_pending WHERE shard = s.shard AND since < %s "
    "ORDER BY since LIMIT %s) d LIMIT %s"
)
"""Due rows shard by shard, each shard's oldest first by the (shard, since) index, reading
no more rows than it returns (PostgreSQL). ``shard IN (...) ORDER BY since`` had no index
order across shards: every call read and sorted every due row (265 ms a call at 400k
members, 169 calls for one interval's recording)."""
NO_RANK_ABOVE = "Infinity"
NO_FENCE = 2**62


def _need(text: str | None) -> Decimal | None:
    return None if text is None else Decimal(text)


def _need_text(need: Decimal | None) -> str | None:
    return None if need is None else f"{need:f}"  # Infinity: NO_RANK_ABOVE


def _months(text: str | None) -> dict[str, Decimal] | None:
    """``currency_months`` (issue 19): exact pending currency per month earned."""
    if text is None:
        return None
    return {month: Decimal(value) for month, value in orjson.loads(text).items()}


def _months_text(months: Mapping[str, Decimal] | None) -> str | None:
    if months is None:
        return None
    return orjson.dumps({m: f"{v:f}" for m, v in sorted(months.items()) if v}).decode()


def _row(r: Sequence[Any]) -> PendingRow:
    """A row of ``_COLUMNS``."""
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


def _lock(db: Database, conn: sa.Connection, ids: Sequence[str]) -> dict[str, Held]:
    """The rows of ``ids`` with their explanations, locked until ``conn`` ends."""
    if db.backend == "postgresql":
        rows: list[Sequence[Any]] = list(
            psycopg_connection(conn)
            .execute(
                LOCK_PENDING,
                (orjson.dumps(sorted(set(ids))).decode(),),
            )
            .fetchall()
        )
    else:  # the write lock of BEGIN IMMEDIATE is held already
        rows = []
        for i in range(0, len(ids), _IN_CHUNK):
            rows += conn.execute(
                sa.select(*_columns())
                .select_from(pipeline_pending)
                .where(pipeline_pending.c.user_id.in_(ids[i : i + _IN_CHUNK]))
            ).all()
    return {r[0]: Held(_row(r), explain.loads(r[11])) for r in rows}


def _columns() -> list[sa.ColumnClause[Any]]:
    return [sa.column(name.strip()) for name in _COLUMNS.split(",")]


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
    checkpoint's): lock the members' rows, let the domain accumulate them
    (``loyalty.domain.pending.accumulate``), store its rows. Returns the members to
    settle now: new rows (rank need unknown) and rows whose pending reaches the rank need.

    The erasure guard, as the event insert's: raises ``StreamErased`` (the transaction,
    checkpoint included, rolls back) if a contributing member is being erased, or was
    erased after the caller's erasure generation ``fence`` (its window may hold events
    of before the erasure)."""
    if not contributions:
        return []
    ids = sorted({c.user_id for c in contributions})
    _guard(db, conn, ids, fence)
    result = accumulate(_lock(db, conn, ids), contributions, shard, end, now)
    if result.rows:
        _store(db, conn, shard, end, result.rows, start if start is not None else end)
    return list(result.settle)


def _store(
    db: Database,
    conn: sa.Connection,
    shard: int,
    end: Position,
    rows: Sequence[Held],
    first: Position,
) -> None:
    """Insert or update ``rows`` (a new row also takes its shard, ``since`` and ``first``,
    the start of the window that began it; an existing row keeps them)."""
    if db.backend == "postgresql":
        out = [
            (
                h.row.user_id,
                f"{h.row.currency:f}",  # positional notation: SQL can cast it (leaderboard)
                f"{h.row.rank_points:f}",
                h.row.event_count,
                h.row.rule_version,
                _months_text(h.row.months),
                None if h.summary is None else explain.dumps(h.summary),
                _need_text(h.row.rank_need),
                h.row.since.isoformat(),
            )
            for h in rows
        ]
        psycopg_connection(conn).execute(
            f"INSERT INTO pipeline_pending ({_COLUMNS}) "
            "SELECT e->>0, %s, e->>1, e->>2, (e->>3)::bigint, (e->>4)::int, %s, %s, "
            "(e->>8)::timestamptz, e->>7, e->>5, e->>6, %s, %s "
            "FROM jsonb_array_elements(%s::text::jsonb) AS e "
            "ON CONFLICT (user_id) DO UPDATE SET currency = excluded.currency, "
            "rank_points = excluded.rank_points, event_count = excluded.event_count, "
            "rule_version = excluded.rule_version, upto_txid = excluded.upto_txid, "
            "upto_seq = excluded.upto_seq, currency_months = excluded.currency_months, "
            "explain = excluded.explain, rank_need = excluded.rank_need",
            (shard, end[0], end[1], first[0], first[1], orjson.dumps(out).decode()),
        )
        return
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
                "rank_need",
            )
        },
    )
    conn.execute(
        stmt,
        [
            {
                "user_id": h.row.user_id,
                "shard": shard,
                "currency": f"{h.row.currency:f}",
                "rank_points": f"{h.row.rank_points:f}",
                "event_count": h.row.event_count,
                "rule_version": h.row.rule_version,
                "upto_txid": end[0],
                "upto_seq": end[1],
                "since": h.row.since,
                "rank_need": _need_text(h.row.rank_need),
                "currency_months": _months_text(h.row.months),
                "explain": None if h.summary is None else explain.dumps(h.summary),
                "from_txid": first[0],
                "from_seq": first[1],
            }
            for h in rows
        ],
    )


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


ONE = f"SELECT {_COLUMNS} FROM pipeline_pending WHERE user_id = %s"
"""One member's row, by primary key: the member read's (PostgreSQL)."""
MANY = f"SELECT {_COLUMNS} FROM pipeline_pending WHERE user_id = ANY(%s::text[])"
"""The rows of a list of members, one array parameter (PostgreSQL): ``load``'s."""


class PendingTable:
    """Reads and small writes of ``pipeline_pending`` outside the pipeline's merge.

    ``connect`` (PostgreSQL): a connection of the event store's pool (autocommit) for a
    view's :meth:`one`, which has just read the member's stream there: one round trip,
    where the engine's adds its checkout's ping. Only views take it: a command's read
    waited there behind saves that hold the pool's connections while they wait for the
    event insert's lock (the ``spend`` benchmark's p99 57 -> 105 ms when spends read
    their row there too)."""

    def __init__(
        self,
        db: Database,
        connect: Callable[[], AbstractContextManager[psycopg.Connection[Any]]] | None = None,
    ) -> None:
        self._db = db
        self._connect = connect

    def one(self, user_id: str, *, beside_stream: bool = False) -> PendingRow | None:
        """The member's row, if any: on PostgreSQL one prepared statement in autocommit
        (no ``BEGIN``/``COMMIT``, no statement built per call), on the event store's pool
        if ``beside_stream`` and ``connect`` was given, else on the engine's."""
        if self._db.backend != "postgresql":
            return self.load([user_id]).get(user_id)
        connect = self._connect if beside_stream and self._connect else self._autocommit
        with connect() as conn, conn.cursor(row_factory=tuple_row) as cur:
            row = cur.execute(ONE, (user_id,)).fetchone()
        return _row(row) if row is not None else None

    @contextmanager
    def _autocommit(self) -> Iterator[psycopg.Connection[Any]]:
        """The psycopg connection of an engine checkout, in autocommit."""
        with self._db.engine.connect() as conn:
            yield psycopg_connection(conn.execution_options(isolation_level="AUTOCOMMIT"))

    def load(self, user_ids: Iterable[str]) -> dict[str, PendingRow]:
        ids = sorted(set(user_ids))
        found: dict[str, PendingRow] = {}
        if self._db.backend == "postgresql":
            # one array parameter: an IN list of 500 was 5 ms a call in SQLAlchemy's and
            # psycopg's query building alone (7 % of an expiry run, which loads a page)
            with self._autocommit() as raw, raw.cursor(row_factory=tuple_row) as cur:
                for r in cur.execute(MANY, (ids,)):
                    found[r[0]] = _row(r)
            return found
        c = pipeline_pending.c
        columns = _columns()
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
        ``before``, at most ``limit`` (oldest first; on PostgreSQL within each shard, the
        shards in turn)."""
        if not shards:
            return []
        if self._db.backend == "postgresql":
            with self._db.read() as conn:
                rows = psycopg_connection(conn).execute(DUE, (sorted(shards), before, limit, limit))
                return [r[0] for r in rows]
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
        ordered = sorted(needs, key=lambda n: n[0])  # the merge's lock order
        if self._db.backend == "postgresql":
            keys = [
                [user_id, upto[0], upto[1], NO_RANK_ABOVE if need is None else f"{need:f}"]
                for user_id, upto, need in ordered
            ]
            with self._db.write() as conn:
                psycopg_connection(conn).execute(
                    SET_NEEDS,
                    (orjson.dumps(keys).decode(),),
                )
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
                    for user_id, upto, need in ordered
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


def erase_member(db: Database, user_id: str) -> int:
    """Forget-me: delete the member's pending earnings. After the marker (state erasing)
    is committed; a pipeline commit already under way is waited for (its checkpoint row
    locks, taken here too on PostgreSQL; SQLite's write lock), and every later one
    refuses contributions of a member being erased (:func:`merge`)."""
    with db.write() as conn:
        if db.backend == "postgresql":
            conn.execute(
                sa.text("SELECT shard FROM pipeline_checkpoints ORDER BY shard FOR UPDATE")
            )
        result = conn.execute(
            sa.text("DELETE FROM pipeline_pending WHERE user_id = :u"), {"u": user_id}
        )
        return int(result.rowcount)
