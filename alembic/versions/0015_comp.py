"""Rules versions keyed to what the pipeline weighed (issue 25).

``pipeline_checkpoints.pending_version``: the rules version a noted window is weighed
under, read in the transaction that notes the window's end (a re-read after a crash
weighs under the same version). ``rule_version_starts``: per shard, the checkpoint
position where a version took effect (the start of the first window noted under it, or
the position a compensation fixed under the checkpoint's lock): rows at or before it were
weighed under older versions, rows after it under this one or a newer one.

Revision ID: 0015_comp
Revises: 0014_pending
Create Date: 2026-12-04
"""

from alembic import op

revision = "0015_comp"
down_revision = "0014_pending"
branch_labels = None
depends_on = None

STATEMENTS = [
    "ALTER TABLE pipeline_checkpoints ADD COLUMN pending_version INTEGER",
    """
    CREATE TABLE rule_version_starts (
        shard INTEGER NOT NULL,
        version INTEGER NOT NULL,
        txid BIGINT NOT NULL,
        seq BIGINT NOT NULL,
        PRIMARY KEY (shard, version)
    )
    """,
]


def upgrade() -> None:
    for statement in STATEMENTS:
        op.execute(statement)


def downgrade() -> None:
    op.execute("DROP TABLE rule_version_starts")
    op.execute("ALTER TABLE pipeline_checkpoints DROP COLUMN pending_version")
