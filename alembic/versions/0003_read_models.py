"""Read models: member balances (and the leaderboard index), statement history, and the
tracking position of each projection.

Every read-model table is keyed by ``user_id`` so forget-me deletes a member's rows by
user id; none keeps a copy of an event beyond the fields a statement shows.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27
"""

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

STATEMENTS = [
    # The position of each projection in the event store's notification log, updated in
    # the same transaction as the rows it produced.
    """
    CREATE TABLE projection_tracking (
        name VARCHAR(64) PRIMARY KEY,
        position BIGINT NOT NULL
    )
    """,
    # ``member_id`` is the event stream's id (uuid5 of user_id): events other than
    # Created carry only it, so the projection maps it back to the user id here.
    """
    CREATE TABLE member_balances (
        user_id VARCHAR(128) PRIMARY KEY,
        member_id VARCHAR(36) NOT NULL UNIQUE,
        currency BIGINT NOT NULL,
        rank_points BIGINT NOT NULL,
        lifetime_currency BIGINT NOT NULL,
        updated_at TIMESTAMP WITH TIME ZONE NOT NULL
    )
    """,
    "CREATE INDEX member_balances_leaderboard_idx ON member_balances (rank_points DESC, user_id)",
    # One row per statement entry; ``position`` is the event's version in the member's
    # stream (stable across rebuilds), newest first via the primary key.
    """
    CREATE TABLE member_history (
        user_id VARCHAR(128) NOT NULL,
        position BIGINT NOT NULL,
        kind VARCHAR(16) NOT NULL,
        currency BIGINT NOT NULL,
        rank_points BIGINT NOT NULL,
        at TIMESTAMP WITH TIME ZONE NOT NULL,
        ref TEXT,
        PRIMARY KEY (user_id, position)
    )
    """,
]


def upgrade() -> None:
    for statement in STATEMENTS:
        op.execute(statement)


def downgrade() -> None:
    for table in ("member_history", "member_balances", "projection_tracking"):
        op.execute(f"DROP TABLE {table}")
