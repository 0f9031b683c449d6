"""Our own tables (SQLAlchemy Core). Alembic migrations create them; the event store's
tables belong to the ``eventsourcing`` library and are excluded from autogenerate."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

metadata = sa.MetaData()

# Tables owned by the eventsourcing library (never touched by Alembic autogenerate).
EVENT_STORE_TABLES = frozenset({"member_events", "member_snapshots", "notification_tracking"})
# Day partitions of the ingress log are created and dropped at run time.
INGRESS_PARTITION_PREFIX = "ingress_events_p"

Timestamp = sa.DateTime(timezone=True)
Json = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")

api_keys = sa.Table(
    "api_keys",
    metadata,
    sa.Column("key_id", sa.String(32), primary_key=True),
    sa.Column("name", sa.String(128), nullable=False),
    sa.Column("role", sa.String(16), nullable=False),
    sa.Column("secret_hash", sa.String(64), nullable=False),
    sa.Column("created_at", Timestamp, nullable=False),
    sa.Column("revoked_at", Timestamp, nullable=True),
)

# On PostgreSQL this table is partitioned by RANGE (occurred_at), one partition per UTC
# day, each with its own UNIQUE (source, event_id); ``txid`` is the inserting
# transaction's id (xid8), which makes the reader's order gap-safe. On SQLite ``seq`` is
# an AUTOINCREMENT rowid (never reused) and ``txid`` is always 0: SQLite has one writer
# at a time, so rowid order is commit order.
ingress_events = sa.Table(
    "ingress_events",
    metadata,
    sa.Column("seq", sa.BigInteger, nullable=False),
    sa.Column("txid", sa.BigInteger, nullable=False),
    sa.Column("shard", sa.SmallInteger, nullable=False),
    sa.Column("source", sa.String(128), nullable=False),
    sa.Column("event_id", sa.String(128), nullable=False),
    sa.Column("user_id", sa.String(128), nullable=False),
    sa.Column("type", sa.String(64), nullable=False),
    sa.Column("occurred_at", Timestamp, nullable=False),
    sa.Column("received_at", Timestamp, nullable=False),
    sa.Column("attributes", Json, nullable=False),
)
