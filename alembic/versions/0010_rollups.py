"""Daily rollups, kept forever (``loyalty.adapters.rollup_store``): activity per day x
source x event type x shard (exact decimal sums as text, a HyperLogLog sketch of the
members, no user id), account figures per day and members per rank per day, and the
checkpoint positions at which the rollups began (``rollup_origin``: rows at or before
them were processed unrolled, so retention keeps their days).

On a database that already has accounts, the account rollups are filled from the read
models as they stand (``member_history`` holds every currency change with its time):
per day, what was credited, spent, refunded and adjusted, the change of outstanding
currency and the new members; members with a balance and per rank are today's, counted
from each member's first day (their history before the upgrade is not kept anywhere).
The rollup watermark is set to the read models' position, so the projection counts only
what comes after. Activity before the upgrade is in no rollup (``rollup_origin``).

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-29
"""

from collections import defaultdict
from datetime import date

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

COUNTERS = (
    "currency_credited",
    "rank_points_credited",
    "currency_spent",
    "currency_refunded",
    "currency_adjusted",
    "rank_points_adjusted",
    "currency_expired",
    "currency_forgotten",
    "new_members",
    "members_change",
    "holders_change",
    "outstanding_change",
)


def upgrade() -> None:
    blob = "BYTEA" if op.get_bind().dialect.name == "postgresql" else "BLOB"
    op.execute(
        f"""
        CREATE TABLE rollup_activity (
            day DATE NOT NULL,
            source VARCHAR(128) NOT NULL,
            event_type VARCHAR(64) NOT NULL,
            shard INTEGER NOT NULL,
            events BIGINT NOT NULL,
            earning_events BIGINT NOT NULL,
            currency TEXT NOT NULL,
            rank_points TEXT NOT NULL,
            members_sketch {blob} NOT NULL,
            PRIMARY KEY (day, source, event_type, shard)
        )
        """
    )
    columns = ",\n".join(f"{name} BIGINT NOT NULL" for name in COUNTERS)
    op.execute(f"CREATE TABLE rollup_accounts (day DATE NOT NULL PRIMARY KEY, {columns})")
    op.execute(
        """
        CREATE TABLE rollup_ranks (
            day DATE NOT NULL,
            rank VARCHAR(64) NOT NULL,
            change BIGINT NOT NULL,
            PRIMARY KEY (day, rank)
        )
        """
    )
    op.execute(
        """
        CREATE TABLE rollup_origin (
            shard INTEGER NOT NULL PRIMARY KEY,
            txid BIGINT NOT NULL,
            seq BIGINT NOT NULL
        )
        """
    )
    # what the pipeline processed before this migration was never rolled up
    op.execute(
        "INSERT INTO rollup_origin (shard, txid, seq) SELECT shard, txid, seq "
        "FROM pipeline_checkpoints WHERE txid > 0 OR seq > 0"
    )

    _backfill_accounts()


def _day(value: object) -> date:
    return value if isinstance(value, date) else date.fromisoformat(str(value)[:10])


def _backfill_accounts() -> None:
    bind = op.get_bind()
    pg = bind.dialect.name == "postgresql"
    day = "(at AT TIME ZONE 'UTC')::date" if pg else "substr(at, 1, 10)"
    days: dict[date, dict[str, int]] = defaultdict(lambda: dict.fromkeys(COUNTERS, 0))
    flows = bind.execute(
        sa.text(
            f"SELECT {day} AS d, kind, coalesce(sum(currency), 0), coalesce(sum(rank_points), 0) "
            "FROM member_history GROUP BY 1, 2"
        )
    ).all()
    for d, kind, currency, points in flows:
        row = days[_day(d)]
        row["outstanding_change"] += int(currency)
        if kind == "award":
            row["currency_credited"] += int(currency)
            row["rank_points_credited"] += int(points)
        elif kind == "spend":
            row["currency_spent"] -= int(currency)
        elif kind == "refund":
            row["currency_refunded"] += int(currency)
        elif kind == "adjustment":
            row["currency_adjusted"] += int(currency)
            row["rank_points_adjusted"] += int(points)
    first = bind.execute(
        sa.text(
            f"SELECT h.user_id, min({day}), max(b.currency) FROM member_history h "
            "JOIN member_balances b ON b.user_id = h.user_id GROUP BY h.user_id"
        )
    ).all()
    first_day = {user: _day(d) for user, d, _ in first}
    for user, _d, balance in first:
        row = days[first_day[user]]
        row["new_members"] += 1
        row["members_change"] += 1
        row["holders_change"] += 1 if int(balance) > 0 else 0
    ranks: dict[tuple[date, str], int] = defaultdict(int)
    latest: dict[str, tuple[int, str]] = {}
    for user, position, rank in bind.execute(
        sa.text("SELECT user_id, position, ref FROM member_history WHERE kind = 'rank_changed'")
    ):
        if rank is not None and (user not in latest or position > latest[user][0]):
            latest[user] = (int(position), rank)
    for user, (_, rank) in latest.items():
        if user in first_day:
            ranks[(first_day[user], rank)] += 1
    if days:
        names = ", ".join(COUNTERS)
        values = ", ".join(f":{n}" for n in COUNTERS)
        bind.execute(
            sa.text(f"INSERT INTO rollup_accounts (day, {names}) VALUES (:day, {values})"),
            [{"day": d, **row} for d, row in sorted(days.items())],
        )
    if ranks:
        bind.execute(
            sa.text("INSERT INTO rollup_ranks (day, rank, change) VALUES (:day, :rank, :n)"),
            [{"day": d, "rank": r, "n": n} for (d, r), n in sorted(ranks.items())],
        )
    bind.execute(
        sa.text(
            "INSERT INTO projection_tracking (name, position, epoch) "
            "SELECT 'rollups', position, 0 FROM projection_tracking WHERE name = 'members'"
        )
    )


def downgrade() -> None:
    for table in ("rollup_origin", "rollup_ranks", "rollup_accounts", "rollup_activity"):
        op.execute(f"DROP TABLE {table}")
    op.execute("DELETE FROM projection_tracking WHERE name = 'rollups'")
    op.execute("DELETE FROM loyalty_meta WHERE key = 'sketch_key'")
