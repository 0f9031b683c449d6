"""When each API key was last used (issue 33, item 6).

``api_keys.last_used_at``: set when a process verifies the key and the stored time is
older than a minute (so at most one write per key per minute per process); NULL: never
used since this revision.

Revision ID: 0017_operator
Revises: 0016_egress
Create Date: 2026-12-04
"""

from alembic import op

revision = "0017_operator"
down_revision = "0016_egress"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE api_keys ADD COLUMN last_used_at TIMESTAMP WITH TIME ZONE")


def downgrade() -> None:
    op.execute("ALTER TABLE api_keys DROP COLUMN last_used_at")
