"""Erasure guard: forget markers carry a sequence number (the event insert refuses a save
prepared before a member's erasure began); the projection quarantines events it cannot
apply.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-29
"""

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

STATEMENTS = [
    # The erasure generation at which the marker was set (``loyalty_meta.erasure_seq``,
    # bumped in the marker's own transaction).
    "ALTER TABLE forget_markers ADD COLUMN seq BIGINT NOT NULL DEFAULT 0",
    # The event insert looks markers up by stream id, under the event table's lock.
    "CREATE INDEX forget_markers_member_idx ON forget_markers (member_id)",
    "INSERT INTO loyalty_meta (key, value) VALUES ('erasure_seq', '0')",
    # Events a projection could not apply: skipped (the projection moved on), kept here
    # with the error until a rebuild or `loyalty doctor --repair` deals with them.
    """
    CREATE TABLE projection_quarantine (
        name VARCHAR(64) NOT NULL,
        position BIGINT NOT NULL,
        member_id VARCHAR(36) NOT NULL,
        originator_version BIGINT NOT NULL,
        topic TEXT NOT NULL,
        error TEXT NOT NULL,
        quarantined_at TIMESTAMP WITH TIME ZONE NOT NULL,
        PRIMARY KEY (name, position)
    )
    """,
    "CREATE INDEX projection_quarantine_member_idx ON projection_quarantine (member_id)",
]


def upgrade() -> None:
    for statement in STATEMENTS:
        op.execute(statement)


def downgrade() -> None:
    op.execute("DROP TABLE projection_quarantine")
    op.execute("DELETE FROM loyalty_meta WHERE key = 'erasure_seq'")
    op.execute("DROP INDEX forget_markers_member_idx")
    op.execute("ALTER TABLE forget_markers DROP COLUMN seq")
