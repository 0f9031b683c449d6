"""Adjustment reasons in the statement (issue 32 item 8).

``member_history.reason``: the reason of an adjustment line (the operator's text, stored
in the account's ``Adjusted`` event already: no personal data); NULL for every other
kind, and for adjustment lines projected before this revision until the read models are
rebuilt (``loyalty projections rebuild``).

Revision ID: 0021_contract2
Revises: 0020_nats
Create Date: 2026-12-04
"""

from alembic import op

revision = "0021_contract2"
down_revision = "0020_nats"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE member_history ADD COLUMN reason TEXT")


def downgrade() -> None:
    op.execute("ALTER TABLE member_history DROP COLUMN reason")
