"""Events out: a way out's failing state (since when, and what failed: never a URL), on
its delivery cursor, shown by GET /v1/webhooks and the console.

Revision ID: 0016_egress
Revises: 0015_comp
Create Date: 2026-12-04
"""

from alembic import op

revision = "0016_egress"
down_revision = "0015_comp"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE delivery_cursors ADD COLUMN failing_since TIMESTAMP WITH TIME ZONE")
    op.execute("ALTER TABLE delivery_cursors ADD COLUMN last_error TEXT")


def downgrade() -> None:
    op.execute("ALTER TABLE delivery_cursors DROP COLUMN last_error")
    op.execute("ALTER TABLE delivery_cursors DROP COLUMN failing_since")
