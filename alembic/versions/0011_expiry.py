"""Currency expiry (issue 19): the expiry index and pending currency by month.

``member_lots`` says which members may hold currency of which month earned (``lot``,
``"YYYY-MM"``; ``"0000-00"`` is the legacy lot: currency from before lots were tracked),
so the expiry job reads only members with lots due (index on ``lot``). The projection
keeps it (credited lots in, expired lots out) and rebuilds it with the read models; it
starts with the legacy lot of every balance above zero, as a rebuild would give.

``pipeline_pending.currency_months``: the exact pending currency per month earned
(JSON ``{"YYYY-MM": "decimal"}``), so a recording that spans a month end credits each
month's lot. A row from before (NULL) is credited to the month it is recorded in.

``member_ranks``: each ranked member's recorded rank (the projection keeps it from
``RankChanged``), so the scheduled job re-qualifies ranked members only.

Revision ID: 0011
Revises: 0009
Create Date: 2026-11-29
"""

from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

STATEMENTS = [
    """
    CREATE TABLE member_lots (
        user_id VARCHAR(128) NOT NULL,
        lot VARCHAR(7) NOT NULL,
        PRIMARY KEY (user_id, lot)
    )
    """,
    "CREATE INDEX member_lots_due_idx ON member_lots (lot, user_id)",
    "INSERT INTO member_lots (user_id, lot) "
    "SELECT user_id, '0000-00' FROM member_balances WHERE currency > 0",
    "ALTER TABLE pipeline_pending ADD COLUMN currency_months TEXT",
    """
    CREATE TABLE member_ranks (
        user_id VARCHAR(128) PRIMARY KEY,
        rank VARCHAR(64) NOT NULL
    )
    """,
    "CREATE INDEX member_ranks_rank_idx ON member_ranks (rank, user_id)",
    # each member's last recorded rank, as the projection would give
    "INSERT INTO member_ranks (user_id, rank) SELECT h.user_id, h.ref FROM member_history h "
    "WHERE h.kind = 'rank_changed' AND h.ref IS NOT NULL AND h.position = "
    "(SELECT max(h2.position) FROM member_history h2 "
    "WHERE h2.user_id = h.user_id AND h2.kind = 'rank_changed')",
]


def upgrade() -> None:
    for statement in STATEMENTS:
        op.execute(statement)


def downgrade() -> None:
    op.execute("DROP TABLE member_ranks")
    op.execute("ALTER TABLE pipeline_pending DROP COLUMN currency_months")
    op.execute("DROP TABLE member_lots")
