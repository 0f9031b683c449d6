"""Forget-me: durable requests with receipts, short-lived markers, projection epochs.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-26
"""

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

STATEMENTS = [
    # The receipt: times, status, counts per location; never the user id.
    """
    CREATE TABLE forget_requests (
        request_id VARCHAR(32) PRIMARY KEY,
        status VARCHAR(16) NOT NULL,
        step VARCHAR(32),
        requested_at TIMESTAMP WITH TIME ZONE NOT NULL,
        completed_at TIMESTAMP WITH TIME ZONE,
        erased TEXT NOT NULL
    )
    """,
    "CREATE INDEX forget_requests_status_idx ON forget_requests (status)",
    # The user id of a request, kept only while it is carried out (to resume after a
    # crash) and deleted when it completes. Rows are only inserted and deleted, never
    # updated, so no older copy of the id is left in a page (SQLite secure_delete).
    """
    CREATE TABLE forget_subjects (
        request_id VARCHAR(32) PRIMARY KEY,
        user_id VARCHAR(128) NOT NULL
    )
    """,
    # Markers hold no user id: a salted hash (for ingress) and the stream id (which the
    # event store already uses as the stream name). They expire with the retention window.
    """
    CREATE TABLE forget_markers (
        subject_hash VARCHAR(64) PRIMARY KEY,
        member_id VARCHAR(36) NOT NULL,
        requested_at TIMESTAMP WITH TIME ZONE NOT NULL,
        state VARCHAR(16) NOT NULL,
        expires_at TIMESTAMP WITH TIME ZONE NOT NULL
    )
    """,
    "CREATE TABLE loyalty_meta (key VARCHAR(64) PRIMARY KEY, value TEXT NOT NULL)",
    # Bumped by forget-me in the transaction that deletes a member's read-model rows, so a
    # projection batch read before the deletion cannot be applied after it.
    "ALTER TABLE projection_tracking ADD COLUMN epoch BIGINT NOT NULL DEFAULT 0",
]


def upgrade() -> None:
    for statement in STATEMENTS:
        op.execute(statement)


def downgrade() -> None:
    op.execute("ALTER TABLE projection_tracking DROP COLUMN epoch")
    for table in ("loyalty_meta", "forget_markers", "forget_subjects", "forget_requests"):
        op.execute(f"DROP TABLE {table}")
