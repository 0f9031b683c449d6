"""Who stored each rules version (issue 33, item 4); the console's recent members
(item 3).

``rule_versions.author``: the name of the API key that stored the version (the console's
signed-in key, ``PUT /v1/rules``'s key), or ``cli:<os user>`` for ``loyalty rules
load``/``apply``; NULL for the built-in version 1 and for versions stored before this
revision (shown as "unknown").

``member_balances_recent_idx`` (``updated_at DESC, user_id``): the console lists the
members changed most recently, a page at a time by keyset, without sorting the table.

Revision ID: 0019_rule_authors
Revises: 0018_contract
Create Date: 2026-12-04
"""

from alembic import op

revision = "0019_rule_authors"
down_revision = "0018_contract"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE rule_versions ADD COLUMN author VARCHAR(128)")
    op.execute(
        "CREATE INDEX member_balances_recent_idx ON member_balances (updated_at DESC, user_id)"
    )


def downgrade() -> None:
    op.execute("DROP INDEX member_balances_recent_idx")
    op.execute("ALTER TABLE rule_versions DROP COLUMN author")
