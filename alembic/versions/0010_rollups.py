"""Daily rollups, kept forever (``loyalty.adapters.rollup_store``): activity per day x
source x event type x shard (exact decimal sums as text, a HyperLogLog sketch of the
members, no user id), account figures per day and members per rank per day, and the
checkpoint positions at which the rollups began (``rollup_origin``: rows at or before
them were processed unrolled, so retention keeps their days).

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-29
"""

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


def downgrade() -> None:
    for table in ("rollup_origin", "rollup_ranks", "rollup_accounts", "rollup_activity"):
        op.execute(f"DROP TABLE {table}")
