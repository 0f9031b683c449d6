"""The de-duplication keys of the ingress log on NATS JetStream (issue 31, item 6).

``stream_ingress_keys``: one row per (source, event_id) published to the JetStream
ingress stream, claimed before the publish (``seq`` NULL) and confirmed with the stream
sequence JetStream acknowledged. JetStream's own duplicate window (Nats-Msg-Id) is
minutes; this table de-duplicates across the whole retention window, and is deleted by
day with it. Unused (empty) with the database ingress log.

Revision ID: 0020_nats
Revises: 0019_rule_authors
Create Date: 2026-12-04
"""

import sqlalchemy as sa
from alembic import op

revision = "0020_nats"
down_revision = "0019_rule_authors"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "stream_ingress_keys",
        sa.Column("source", sa.String(128), primary_key=True),
        sa.Column("event_id", sa.String(128), primary_key=True),
        sa.Column("day", sa.Date, nullable=False),
        sa.Column("shard", sa.SmallInteger, nullable=False),
        sa.Column("fingerprint", sa.BigInteger, nullable=False),
        sa.Column("seq", sa.BigInteger, nullable=True),
        sa.Column("claimed_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("stream_ingress_keys_day", "stream_ingress_keys", ["day"])


def downgrade() -> None:
    op.drop_index("stream_ingress_keys_day", table_name="stream_ingress_keys")
    op.drop_table("stream_ingress_keys")
