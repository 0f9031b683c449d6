"""Foundation: API keys and the ingress log.

Revision ID: 0001
Revises:
Create Date: 2026-11-26
"""

from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

API_KEYS = """
CREATE TABLE api_keys (
    key_id VARCHAR(32) PRIMARY KEY,
    name VARCHAR(128) NOT NULL,
    role VARCHAR(16) NOT NULL CHECK (role IN ('ingest', 'shop', 'operator')),
    secret_hash VARCHAR(64) NOT NULL,
    created_at TIMESTAMP WITH TIME ZONE NOT NULL,
    revoked_at TIMESTAMP WITH TIME ZONE
)
"""

PG_INGRESS = [
    "CREATE SEQUENCE ingress_events_seq AS bigint",
    """
    CREATE TABLE ingress_events (
        seq bigint NOT NULL DEFAULT nextval('ingress_events_seq'),
        txid bigint NOT NULL DEFAULT (pg_current_xact_id()::text::bigint),
        shard smallint NOT NULL,
        source text NOT NULL,
        event_id text NOT NULL,
        user_id text NOT NULL,
        type text NOT NULL,
        occurred_at timestamptz NOT NULL,
        received_at timestamptz NOT NULL DEFAULT now(),
        attributes jsonb NOT NULL
    ) PARTITION BY RANGE (occurred_at)
    """,
    "ALTER SEQUENCE ingress_events_seq OWNED BY ingress_events.seq",
    # Propagates to every day partition; the dedup index is created per partition
    # (a unique index on the parent would have to include occurred_at).
    "CREATE INDEX ingress_events_read_idx ON ingress_events (shard, txid, seq)",
]

SQLITE_INGRESS = [
    """
    CREATE TABLE ingress_events (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        txid INTEGER NOT NULL DEFAULT 0,
        shard INTEGER NOT NULL,
        source TEXT NOT NULL,
        event_id TEXT NOT NULL,
        user_id TEXT NOT NULL,
        type TEXT NOT NULL,
        occurred_at TEXT NOT NULL,
        received_at TEXT NOT NULL,
        attributes TEXT NOT NULL
    )
    """,
    "CREATE UNIQUE INDEX ingress_events_dedup ON ingress_events (source, event_id)",
    "CREATE INDEX ingress_events_read_idx ON ingress_events (shard, txid, seq)",
    "CREATE INDEX ingress_events_occurred_idx ON ingress_events (occurred_at)",
]


def upgrade() -> None:
    op.execute(API_KEYS)
    postgres = op.get_bind().dialect.name == "postgresql"
    for statement in PG_INGRESS if postgres else SQLITE_INGRESS:
        op.execute(statement)


def downgrade() -> None:
    op.execute("DROP TABLE ingress_events")
    op.execute("DROP TABLE api_keys")
