"""The operator console's server-side sessions (no member data: a hashed session id, the
operator key's id, a CSRF token, times).

Revision ID: 0013
Revises: 0012
Create Date: 2026-11-29
"""

from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None

STATEMENTS = [
    """
    CREATE TABLE console_sessions (
        session_hash VARCHAR(64) PRIMARY KEY,
        key_id VARCHAR(32) NOT NULL,
        csrf_token VARCHAR(64) NOT NULL,
        created_at TIMESTAMP WITH TIME ZONE NOT NULL,
        expires_at TIMESTAMP WITH TIME ZONE NOT NULL
    )
    """,
    "CREATE INDEX console_sessions_expires_idx ON console_sessions (expires_at)",
]


def upgrade() -> None:
    for statement in STATEMENTS:
        op.execute(statement)


def downgrade() -> None:
    op.execute("DROP TABLE console_sessions")
