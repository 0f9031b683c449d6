"""Pending rows: forget every noted rank need (issue 25). A need noted before this
version judged lifetime points; under a rank qualification period the need is now the
points of the period against the rank held. Cleared, each row's need is derived again
at its member's next window (until then the row records at the interval, as before).
Derived data only: nothing to restore on downgrade.

Revision ID: 0014_pending
Revises: 0013
Create Date: 2026-12-04
"""

from alembic import op

revision = "0014_pending"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("UPDATE pipeline_pending SET rank_need = NULL")


def downgrade() -> None:
    op.execute("UPDATE pipeline_pending SET rank_need = NULL")
