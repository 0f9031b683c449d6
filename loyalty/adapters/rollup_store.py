"""The daily rollups (see ``loyalty.application.reporting``): kept forever, no user id.

``rollup_activity`` has one row per day x source x event type x *shard*: only the
shard's own checkpoint commit writes its rows (the compare-and-set on the checkpoint row
orders two commits of one shard), so the read-merge-write of the exact decimal sums and
of the sketch needs no lock of its own and shards never wait on each other. The report
adds the shards' rows up (members: the sketches merged).

``rollup_accounts`` / ``rollup_ranks`` have one row per day (and rank), written only by
the member projection (one runner at a time, fenced by its tracking position) with
additive upserts. Forget-me adds its own change (``currency_forgotten``) in its
read-model deletion's transaction; it never has to find a member in a rollup.

``rollup_origin`` holds, per shard, the checkpoint position when the rollups began
(migration 0010): ingress rows at or before it were processed without being rolled up,
so retention keeps their days unless told to drop them anyway.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from datetime import date
from decimal import Decimal
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from loyalty.adapters.db import Database
from loyalty.adapters.tables import member_balances, metadata, projection_tracking
from loyalty.application.reporting import (
    AccountDay,
    AccountFact,
    ActivityFacts,
    StoredActivity,
    fold_accounts,
)
from loyalty.domain import sketch
from loyalty.domain.rules import exact_sum

ROLLUP_TRACKING = "rollups"
"""The projection_tracking row of the rollup watermark (events counted up to it)."""
SKETCH_KEY = "sketch_key"
_IN_CHUNK = 500
loyalty_meta = sa.table("loyalty_meta", sa.column("key", sa.String), sa.column("value", sa.Text))

rollup_activity = sa.Table(
    "rollup_activity",
    metadata,
    sa.Column("day", sa.Date, primary_key=True),
    sa.Column("source", sa.String(128), primary_key=True),
    sa.Column("event_type", sa.String(64), primary_key=True),
    sa.Column("shard", sa.Integer, primary_key=True),
    sa.Column("events", sa.BigInteger, nullable=False),
    sa.Column("earning_events", sa.BigInteger, nullable=False),
    sa.Column("currency", sa.Text, nullable=False),
    sa.Column("rank_points", sa.Text, nullable=False),
    sa.Column("members_sketch", sa.LargeBinary, nullable=False),
)

_ACCOUNT_COUNTERS = AccountDay.COUNTERS
rollup_accounts = sa.Table(
    "rollup_accounts",
    metadata,
    sa.Column("day", sa.Date, primary_key=True),
    *(sa.Column(name, sa.BigInteger, nullable=False) for name in _ACCOUNT_COUNTERS),
)

rollup_ranks = sa.Table(
    "rollup_ranks",
    metadata,
    sa.Column("day", sa.Date, primary_key=True),
    sa.Column("rank", sa.String(64), primary_key=True),
    sa.Column("change", sa.BigInteger, nullable=False),
)

rollup_origin = sa.Table(
    "rollup_origin",
    metadata,
    sa.Column("shard", sa.Integer, primary_key=True),
    sa.Column("txid", sa.BigInteger, nullable=False),
    sa.Column("seq", sa.BigInteger, nullable=False),
)

TABLES = ("rollup_activity", "rollup_accounts", "rollup_ranks", "rollup_origin")


class RollupStore:
    def __init__(self, db: Database) -> None:
        self._db = db
        self._key: bytes | None = None

    def _insert(self, table: Any) -> Any:
        return (postgresql.insert if self._db.backend == "postgresql" else sqlite.insert)(table)

    def sketch_key(self) -> bytes:
        """The deployment's key of the member sketches (made once, kept in loyalty_meta)."""
        if self._key is None:
            m = loyalty_meta.c
            with self._db.read() as conn:
                value = conn.execute(sa.select(m.value).where(m.key == SKETCH_KEY)).scalar()
            if value is None:
                with self._db.write() as conn:
                    conn.execute(
                        self._insert(loyalty_meta)
                        .values(key=SKETCH_KEY, value=secrets.token_hex(32))
                        .on_conflict_do_nothing()
                    )
                    value = conn.execute(sa.select(m.value).where(m.key == SKETCH_KEY)).scalar_one()
            self._key = bytes.fromhex(value)
        return self._key

    # ------------------------------------------------------------------ writes

    def add_window(self, conn: sa.Connection, shard: int, facts: ActivityFacts) -> None:
        """Add a window's activity to the shard's rows, inside ``conn``'s transaction
        (the checkpoint's commit, which alone writes the shard's rows)."""
        if not facts:
            return
        key = self.sketch_key()
        r = rollup_activity.c
        days = sorted({k[0] for k in facts.cells})
        stored: dict[tuple[date, str, str], Any] = {}
        for row in conn.execute(
            sa.select(
                r.day,
                r.source,
                r.event_type,
                r.events,
                r.earning_events,
                r.currency,
                r.rank_points,
                r.members_sketch,
            ).where(r.shard == shard, r.day.in_(days))
        ):
            stored[(_day(row[0]), row[1], row[2])] = row
        values: list[dict[str, Any]] = []
        for k, cell in sorted(facts.cells.items()):
            registers = sketch.sketch_of(cell.members, key)
            events, earning = cell.events, cell.earning_events
            currency, points = cell.currency, cell.rank_points
            old = stored.get(k)
            if old is not None:
                events += int(old[3])
                earning += int(old[4])
                currency = exact_sum(currency, Decimal(old[5]))
                points = exact_sum(points, Decimal(old[6]))
                registers = sketch.merge(registers, sketch.decode(old[7]))
            values.append(
                {
                    "day": k[0],
                    "source": k[1],
                    "event_type": k[2],
                    "shard": shard,
                    "events": events,
                    "earning_events": earning,
                    "currency": f"{currency:f}",
                    "rank_points": f"{points:f}",
                    "members_sketch": sketch.encode(registers),
                }
            )
        stmt = self._insert(rollup_activity)
        stmt = stmt.on_conflict_do_update(
            index_elements=["day", "source", "event_type", "shard"],
            set_={
                name: getattr(stmt.excluded, name)
                for name in ("events", "earning_events", "currency", "rank_points")
            }
            | {"members_sketch": stmt.excluded.members_sketch},
        )
        conn.execute(stmt, values)

    def apply_accounts(self, conn: sa.Connection, facts: Sequence[AccountFact], end: int) -> None:
        """Count the facts past the rollup watermark and move it to ``end``, inside the
        projection's transaction, *before* it changes the balance rows (the holders'
        changes start from the balances as projected before the batch)."""
        t = projection_tracking.c
        mark = conn.execute(sa.select(t.position).where(t.name == ROLLUP_TRACKING)).scalar()
        if mark is None:
            conn.execute(projection_tracking.insert().values(name=ROLLUP_TRACKING, position=end))
            mark = 0
        elif int(mark) < end:
            conn.execute(
                projection_tracking.update().where(t.name == ROLLUP_TRACKING).values(position=end)
            )
        new = [f for f in facts if f.position > int(mark)]
        if not new:
            return
        members = sorted({f.member_id for f in new})
        b = member_balances.c
        balances: dict[str, int] = {}
        for i in range(0, len(members), _IN_CHUNK):
            balances.update(
                (str(m), int(c))
                for m, c in conn.execute(
                    sa.select(b.member_id, b.currency).where(
                        b.member_id.in_(members[i : i + _IN_CHUNK])
                    )
                )
            )
        self.add_days(conn, fold_accounts(new, balances))

    def add_days(self, conn: sa.Connection, days: Mapping[date, AccountDay]) -> None:
        """Add the days' changes (additive upserts)."""
        if not days:
            return
        stmt = self._insert(rollup_accounts)
        stmt = stmt.on_conflict_do_update(
            index_elements=["day"],
            set_={
                name: getattr(rollup_accounts.c, name) + getattr(stmt.excluded, name)
                for name in _ACCOUNT_COUNTERS
            },
        )
        conn.execute(
            stmt,
            [
                {"day": day} | {name: getattr(d, name) for name in _ACCOUNT_COUNTERS}
                for day, d in sorted(days.items())
            ],
        )
        ranks = [
            {"day": day, "rank": rank, "change": n}
            for day, d in sorted(days.items())
            for rank, n in sorted(d.ranks.items())
            if n
        ]
        if ranks:
            rstmt = self._insert(rollup_ranks)
            rstmt = rstmt.on_conflict_do_update(
                index_elements=["day", "rank"],
                set_={"change": rollup_ranks.c.change + rstmt.excluded.change},
            )
            conn.execute(rstmt, ranks)

    # ------------------------------------------------------------------ reads

    def activity(self, first: date, last: date) -> list[StoredActivity]:
        r = rollup_activity.c
        with self._db.read() as conn:
            rows = conn.execute(
                sa.select(
                    r.day,
                    r.source,
                    r.event_type,
                    r.events,
                    r.earning_events,
                    r.currency,
                    r.rank_points,
                    r.members_sketch,
                )
                .where(r.day >= first, r.day <= last)
                .order_by(r.day, r.source, r.event_type, r.shard)
            ).all()
        return [
            StoredActivity(
                _day(x[0]),
                x[1],
                x[2],
                int(x[3]),
                int(x[4]),
                Decimal(x[5]),
                Decimal(x[6]),
                sketch.decode(x[7]),
            )
            for x in rows
        ]

    def accounts(self, last: date) -> dict[date, AccountDay]:
        a = rollup_accounts.c
        k = rollup_ranks.c
        out: dict[date, AccountDay] = {}
        with self._db.read() as conn:
            for row in conn.execute(sa.select(rollup_accounts).where(a.day <= last)):
                d = out[_day(row[0])] = AccountDay()
                for name, value in zip(_ACCOUNT_COUNTERS, row[1:], strict=True):
                    setattr(d, name, int(value))
            for day, rank, change in conn.execute(
                sa.select(k.day, k.rank, k.change).where(k.day <= last)
            ):
                d = out.setdefault(_day(day), AccountDay())
                d.ranks[rank] = d.ranks.get(rank, 0) + int(change)
        return out

    def activity_days(self, first: date, last: date) -> list[date]:
        r = rollup_activity.c
        with self._db.read() as conn:
            return [
                _day(d)
                for d in conn.execute(
                    sa.select(r.day).where(r.day >= first, r.day <= last).distinct()
                ).scalars()
            ]

    def origins(self) -> dict[int, tuple[int, int]]:
        o = rollup_origin.c
        with self._db.read() as conn:
            return {
                int(s): (int(t), int(q))
                for s, t, q in conn.execute(sa.select(o.shard, o.txid, o.seq))
            }


def _day(value: Any) -> date:
    return value if isinstance(value, date) else date.fromisoformat(str(value))
