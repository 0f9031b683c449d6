"""Our own tables (SQLAlchemy Core). Alembic migrations create them; the event store's
tables belong to the ``eventsourcing`` library and are excluded from autogenerate."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

metadata = sa.MetaData()

# Tables owned by the eventsourcing library (never touched by Alembic autogenerate):
# (events, snapshots) per backend, as the library names them for the Members application.
EVENT_STORE_TABLES_OF = {
    "sqlite": ("stored_events", "stored_snapshots"),
    "postgresql": ("members_events", "members_snapshots"),
}
EVENT_STORE_TABLES = frozenset(t for pair in EVENT_STORE_TABLES_OF.values() for t in pair)
# Day partitions of the ingress log are created and dropped at run time.
INGRESS_PARTITION_PREFIX = "ingress_events_p"
KEYS_PARTITION_PREFIX = "ingress_keys_g"
# PostgreSQL: the daily cap counters, a partition per day created with the ingress day
# partition and dropped with it (migration 0023).
CAPS_PARTITION_PREFIX = "pipeline_caps_"

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
    sa.Column("last_used_at", Timestamp, nullable=True),  # to the minute (0017_operator)
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
    # TEXT in the database (the API bounds the lengths: 128, 128, 128, 64)
    sa.Column("source", sa.Text, nullable=False),
    sa.Column("event_id", sa.Text, nullable=False),
    sa.Column("user_id", sa.Text, nullable=False),
    sa.Column("type", sa.Text, nullable=False),
    sa.Column("occurred_at", Timestamp, nullable=False),
    sa.Column("received_at", Timestamp, nullable=False),
    sa.Column("attributes", Json, nullable=False),
    sa.Index("ingress_events_read_idx", "shard", "txid", "seq"),
)

# PostgreSQL only (migrations 0006, 0022): one row per stored ingress event, filled by a
# trigger on ingress_events, so that (source, event_id) is unique across day partitions.
# Partitioned by the day the key was received, in generations of eight days, each with
# its own UNIQUE (source, event_id); retention drops a generation whole. (SQLite's one
# table has its own UNIQUE.)
ingress_keys = sa.Table(
    "ingress_keys",
    metadata,
    sa.Column("source", sa.String(128), nullable=False),
    sa.Column("event_id", sa.String(128), nullable=False),
    sa.Column("day", sa.Date, nullable=False),
    # the stored event's content fingerprint (migration 0018; NULL for older keys)
    sa.Column("fingerprint", sa.BigInteger, nullable=True),
    postgresql_partition_by="RANGE (day)",
)

# The ingress log on NATS JetStream (migration 0019): its de-duplication keys, claimed
# before the publish (seq NULL) and confirmed with the acknowledged stream sequence.
stream_ingress_keys = sa.Table(
    "stream_ingress_keys",
    metadata,
    sa.Column("source", sa.String(128), primary_key=True),
    sa.Column("event_id", sa.String(128), primary_key=True),
    sa.Column("day", sa.Date, nullable=False),
    sa.Column("shard", sa.SmallInteger, nullable=False),
    sa.Column("fingerprint", sa.BigInteger, nullable=False),
    sa.Column("seq", sa.BigInteger, nullable=True),
    sa.Column("claimed_at", sa.DateTime(timezone=True), nullable=False),
    sa.Index("stream_ingress_keys_day", "day"),
)

rule_versions = sa.Table(
    "rule_versions",
    metadata,
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("body", sa.Text, nullable=False),
    sa.Column("created_at", Timestamp, nullable=False),
    # the key name that stored the version (migration 0019; NULL: built in, or older)
    sa.Column("author", sa.String(128), nullable=True),
)

pipeline_checkpoints = sa.Table(
    "pipeline_checkpoints",
    metadata,
    sa.Column("shard", sa.Integer, primary_key=True),
    sa.Column("txid", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("seq", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("pending_txid", sa.BigInteger),
    sa.Column("pending_seq", sa.BigInteger),
    sa.Column("processed_total", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("awards_total", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("updated_at", Timestamp),
    # issue 25: the rules version the noted window (pending) is weighed under
    sa.Column("pending_version", sa.Integer),
)

rule_version_starts = sa.Table(
    "rule_version_starts",
    metadata,
    sa.Column("shard", sa.Integer, primary_key=True),
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("txid", sa.BigInteger, nullable=False),
    sa.Column("seq", sa.BigInteger, nullable=False),
)
"""Per shard, the checkpoint position where a rules version took effect: rows at or
before it were weighed under older versions (issue 25)."""

pipeline_caps = sa.Table(
    "pipeline_caps",
    metadata,
    sa.Column("user_id", sa.String(128), primary_key=True),
    sa.Column("event_type", sa.String(64), primary_key=True),
    sa.Column("day", sa.Date, primary_key=True),
    sa.Column("shard", sa.Integer, nullable=False),
    sa.Column("count", sa.Integer, nullable=False),
    sa.Index("pipeline_caps_day_idx", "day"),  # SQLite only: see CAPS_DAY_INDEX
)
CAPS_DAY_INDEX = "pipeline_caps_day_idx"
"""SQLite deletes an expired day's counters by this index; PostgreSQL partitions the
table by day (one partition per day, dropped whole), so it has no such index."""


def caps_partition_day(table: str) -> str | None:
    """``YYYYMMDD`` of a caps day partition's name, else None."""
    rest = table[len(CAPS_PARTITION_PREFIX) :]
    return rest if table.startswith(CAPS_PARTITION_PREFIX) and rest.isdigit() else None


pipeline_pending = sa.Table(
    "pipeline_pending",
    metadata,
    sa.Column("user_id", sa.String(128), primary_key=True),
    sa.Column("shard", sa.Integer, nullable=False),
    sa.Column("currency", sa.Text, nullable=False),
    sa.Column("rank_points", sa.Text, nullable=False),
    sa.Column("event_count", sa.BigInteger, nullable=False),
    sa.Column("rule_version", sa.Integer, nullable=False),
    sa.Column("upto_txid", sa.BigInteger, nullable=False),
    sa.Column("upto_seq", sa.BigInteger, nullable=False),
    sa.Column("since", Timestamp, nullable=False),
    sa.Column("rank_need", sa.Text),
    # issue 20: the accumulated explanation (JSON) and the start of the first window
    sa.Column("explain", sa.Text),
    sa.Column("from_txid", sa.BigInteger),
    sa.Column("from_seq", sa.BigInteger),
    # issue 19: exact pending currency per month earned, JSON {"YYYY-MM": "decimal"}
    # (NULL: a row from before, credited to the month it is recorded in)
    sa.Column("currency_months", sa.Text),
    sa.Index("pipeline_pending_due_idx", "shard", "since"),
)
"""What a member earned and the pipeline has not recorded yet (exact decimal text)."""

award_explanations = sa.Table(
    "award_explanations",
    metadata,
    sa.Column("user_id", sa.String(128), primary_key=True),
    sa.Column("award_id", sa.String(200), primary_key=True),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("rule_version", sa.Integer, nullable=False),
    sa.Column("event_count", sa.BigInteger, nullable=False),
    sa.Column("exact_currency", sa.Text, nullable=False),
    sa.Column("exact_rank_points", sa.Text, nullable=False),
    sa.Column("currency", sa.BigInteger, nullable=False),
    sa.Column("rank_points", sa.BigInteger, nullable=False),
    sa.Column("fraction_currency", sa.Text, nullable=False),
    sa.Column("fraction_rank_points", sa.Text, nullable=False),
    sa.Column("shard", sa.Integer),
    sa.Column("from_txid", sa.BigInteger),
    sa.Column("from_seq", sa.BigInteger),
    sa.Column("upto_txid", sa.BigInteger),
    sa.Column("upto_seq", sa.BigInteger),
    sa.Column("summary", sa.Text, nullable=False),
    sa.Column("recorded_at", Timestamp, nullable=False),
)
"""Why each recorded award (and compensation) is what it is (``loyalty.domain.explain``):
written in the event insert's transaction, kept with the account, erased by forget-me."""

rule_compensations = sa.Table(
    "rule_compensations",
    metadata,
    sa.Column("new_version", sa.Integer, primary_key=True),
    sa.Column("old_version", sa.Integer, nullable=False),
    sa.Column("since", Timestamp, nullable=False),
    sa.Column("until", Timestamp, nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("receipt", sa.Text),
    sa.Column("started_at", Timestamp, nullable=False),
    sa.Column("finished_at", Timestamp),
)
"""One row per ``loyalty rules apply --compensate`` run: its period and receipt."""

# Read models (projections of the member event store). Every table is keyed by user_id,
# so forget-me deletes a member's rows by user id.
projection_tracking = sa.Table(
    "projection_tracking",
    metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("position", sa.BigInteger, nullable=False),
    # bumped by forget-me: a batch read under an older epoch is not applied
    sa.Column("epoch", sa.BigInteger, nullable=False, server_default="0"),
)

member_balances = sa.Table(
    "member_balances",
    metadata,
    sa.Column("user_id", sa.String(128), primary_key=True),
    sa.Column("member_id", sa.String(36), nullable=False, unique=True),
    sa.Column("currency", sa.BigInteger, nullable=False),
    sa.Column("rank_points", sa.BigInteger, nullable=False),
    sa.Column("lifetime_currency", sa.BigInteger, nullable=False),
    sa.Column("updated_at", Timestamp, nullable=False),
    sa.Index("member_balances_leaderboard_idx", sa.desc("rank_points"), "user_id"),
    # the console's recent members, paged by keyset (migration 0019)
    sa.Index("member_balances_recent_idx", sa.desc("updated_at"), "user_id"),
)

member_lots = sa.Table(
    "member_lots",
    metadata,
    sa.Column("user_id", sa.String(128), primary_key=True),
    sa.Column("lot", sa.String(7), primary_key=True),
    sa.Index("member_lots_due_idx", "lot", "user_id"),
)
"""The expiry index: which members may hold currency of which month (lot), so the
expiry job reads only members with lots due. Written by the projection (credited lots
in, expired lots out) and by the job (lots it found empty); rebuilt with the read
models."""

member_ranks = sa.Table(
    "member_ranks",
    metadata,
    sa.Column("user_id", sa.String(128), primary_key=True),
    sa.Column("rank", sa.String(64), nullable=False),
    sa.Index("member_ranks_rank_idx", "rank", "user_id"),
)
"""Each ranked member's recorded rank (the projection, from RankChanged): whom the
scheduled job re-qualifies when ranks have a qualification period."""

member_history = sa.Table(
    "member_history",
    metadata,
    sa.Column("user_id", sa.String(128), primary_key=True),
    sa.Column("position", sa.BigInteger, primary_key=True),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("currency", sa.BigInteger, nullable=False),
    sa.Column("rank_points", sa.BigInteger, nullable=False),
    sa.Column("at", Timestamp, nullable=False),
    sa.Column("ref", sa.Text, nullable=True),
    sa.Column("reason", sa.Text, nullable=True),  # an adjustment's reason (0019)
)

# The operator console's server-side sessions (migration 0013): the SHA-256 of the session
# id (the cookie holds the id itself), the operator key it was opened with (its id, never
# the key), the CSRF token of its forms, and when it expires. No member data.
console_sessions = sa.Table(
    "console_sessions",
    metadata,
    sa.Column("session_hash", sa.String(64), primary_key=True),
    sa.Column("key_id", sa.String(32), nullable=False),
    sa.Column("csrf_token", sa.String(64), nullable=False),
    sa.Column("created_at", Timestamp, nullable=False),
    sa.Column("expires_at", Timestamp, nullable=False),
    sa.Index("console_sessions_expires_idx", "expires_at"),
)

# forget-me (``loyalty.adapters.erasure_store``): requests, their subjects, markers
forget_requests = sa.Table(
    "forget_requests",
    metadata,
    sa.Column("request_id", sa.String(32), primary_key=True),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("step", sa.String(32)),
    sa.Column("requested_at", Timestamp, nullable=False),
    sa.Column("completed_at", Timestamp),
    sa.Column("erased", sa.Text, nullable=False),
    sa.Index("forget_requests_status_idx", "status"),
)
forget_subjects = sa.Table(
    "forget_subjects",
    metadata,
    sa.Column("request_id", sa.String(32), primary_key=True),
    sa.Column("user_id", sa.String(128), nullable=False),
)
forget_markers = sa.Table(
    "forget_markers",
    metadata,
    sa.Column("subject_hash", sa.String(64), primary_key=True),
    sa.Column("member_id", sa.String(36), nullable=False),
    sa.Column("requested_at", Timestamp, nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("expires_at", Timestamp, nullable=False),
    # the erasure generation (loyalty_meta 'erasure_seq') the marker was set at
    sa.Column("seq", sa.BigInteger, nullable=False, server_default="0"),
    sa.Index("forget_markers_member_idx", "member_id"),
)
loyalty_meta = sa.Table(
    "loyalty_meta",
    metadata,
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)
