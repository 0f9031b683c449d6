"""Award explanations, the pending row's explanation, rule compensation runs.

``award_explanations``: one small row per recorded award (and per compensation), keyed by
(user id, award id), written in the event insert's own transaction from the member's
pending row; kept as long as the account (forget-me erases it). ``pipeline_pending`` gains
the accumulated explanation (JSON text) and the start of the first window that fed the
row (the contributing ingress events are those of the member in (from, upto] of its
shard, while retained). ``rule_compensations``: one row per ``loyalty rules apply
--compensate`` run (no member data), so a re-run resumes the same run.

Revision ID: 0012
Revises: 0009
Create Date: 2026-11-29
"""

from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

STATEMENTS = [
    "ALTER TABLE pipeline_pending ADD COLUMN explain TEXT",
    "ALTER TABLE pipeline_pending ADD COLUMN from_txid BIGINT",
    "ALTER TABLE pipeline_pending ADD COLUMN from_seq BIGINT",
    """
    CREATE TABLE award_explanations (
        user_id VARCHAR(128) NOT NULL,
        award_id VARCHAR(200) NOT NULL,
        kind VARCHAR(16) NOT NULL,
        rule_version INTEGER NOT NULL,
        event_count BIGINT NOT NULL,
        exact_currency TEXT NOT NULL,
        exact_rank_points TEXT NOT NULL,
        currency BIGINT NOT NULL,
        rank_points BIGINT NOT NULL,
        fraction_currency TEXT NOT NULL,
        fraction_rank_points TEXT NOT NULL,
        shard INTEGER,
        from_txid BIGINT,
        from_seq BIGINT,
        upto_txid BIGINT,
        upto_seq BIGINT,
        summary TEXT NOT NULL,
        recorded_at TIMESTAMP WITH TIME ZONE NOT NULL,
        PRIMARY KEY (user_id, award_id)
    )
    """,
    """
    CREATE TABLE rule_compensations (
        new_version INTEGER PRIMARY KEY,
        old_version INTEGER NOT NULL,
        since TIMESTAMP WITH TIME ZONE NOT NULL,
        until TIMESTAMP WITH TIME ZONE NOT NULL,
        state VARCHAR(16) NOT NULL,
        receipt TEXT,
        started_at TIMESTAMP WITH TIME ZONE NOT NULL,
        finished_at TIMESTAMP WITH TIME ZONE
    )
    """,
]


def upgrade() -> None:
    for statement in STATEMENTS:
        op.execute(statement)


def downgrade() -> None:
    op.execute("DROP TABLE rule_compensations")
    op.execute("DROP TABLE award_explanations")
    for column in ("from_seq", "from_txid", "explain"):
        op.execute(f"ALTER TABLE pipeline_pending DROP COLUMN {column}")
