"""Pipeline: rules versions, per-shard checkpoints, daily cap counters.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26
"""

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

STATEMENTS = [
    """
    CREATE TABLE rule_versions (
        version INTEGER PRIMARY KEY,
        body TEXT NOT NULL,
        created_at TIMESTAMP WITH TIME ZONE NOT NULL
    )
    """,
    # One row per shard. ``pending_*`` is the end of the window being awarded: written
    # before the awards, so a restart re-reads exactly the same window (same award ids).
    """
    CREATE TABLE pipeline_checkpoints (
        shard INTEGER PRIMARY KEY,
        txid BIGINT NOT NULL DEFAULT 0,
        seq BIGINT NOT NULL DEFAULT 0,
        pending_txid BIGINT,
        pending_seq BIGINT,
        processed_total BIGINT NOT NULL DEFAULT 0,
        awards_total BIGINT NOT NULL DEFAULT 0,
        updated_at TIMESTAMP WITH TIME ZONE
    )
    """,
    # Events of a capped type already counted per member, type and UTC day. Owned by the
    # pipeline; rows of days outside the retention window are deleted by retention, a
    # member's rows by forget-me.
    """
    CREATE TABLE pipeline_caps (
        user_id VARCHAR(128) NOT NULL,
        event_type VARCHAR(64) NOT NULL,
        day DATE NOT NULL,
        shard INTEGER NOT NULL,
        count INTEGER NOT NULL,
        PRIMARY KEY (user_id, event_type, day)
    )
    """,
    "CREATE INDEX pipeline_caps_day_idx ON pipeline_caps (day)",
]


def upgrade() -> None:
    for statement in STATEMENTS:
        op.execute(statement)


def downgrade() -> None:
    for table in ("pipeline_caps", "pipeline_checkpoints", "rule_versions"):
        op.execute(f"DROP TABLE {table}")
