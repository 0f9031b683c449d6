"""Pending balances: what members earned and the pipeline has not yet recorded.

One row per member with something unrecorded (deleted by the recording that credits it,
in the event insert's own transaction). Exact amounts as decimal text (a rule's weights
times up to 32 multipliers have no useful fixed-point bound; text is exact on both
backends and only Python does arithmetic on it). ``upto_txid, upto_seq`` is the end of
the last window that changed the row: the row's revision (window ends of a shard only
grow, a member lives in one shard) and the recording's award id.

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-29
"""

from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

STATEMENTS = [
    """
    CREATE TABLE pipeline_pending (
        user_id VARCHAR(128) PRIMARY KEY,
        shard INTEGER NOT NULL,
        currency TEXT NOT NULL,
        rank_points TEXT NOT NULL,
        event_count BIGINT NOT NULL,
        rule_version INTEGER NOT NULL,
        upto_txid BIGINT NOT NULL,
        upto_seq BIGINT NOT NULL,
        since TIMESTAMP WITH TIME ZONE NOT NULL,
        rank_need TEXT
    )
    """,
    "CREATE INDEX pipeline_pending_due_idx ON pipeline_pending (shard, since)",
]


def upgrade() -> None:
    for statement in STATEMENTS:
        op.execute(statement)


def downgrade() -> None:
    op.execute("DROP TABLE pipeline_pending")
