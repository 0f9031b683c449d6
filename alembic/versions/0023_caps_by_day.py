"""Daily cap counters in a partition per day, dropped with the day (issue 30).

PostgreSQL only. ``pipeline_caps`` was one table: retention deleted an expired day's
counters row by row and their pages stayed with the table and its indexes (2.6 MB per 1M
ingress events at 0 rows, the largest part of the pipeline's bytes after retention). Now
it is partitioned by ``day`` (RANGE, a partition per UTC day, named
``pipeline_caps_YYYYMMDD``), created with the ingress day partition of the same day (a
counter is of the day its event occurred, the day of that event's partition), and
retention drops a day's counters with the day (DETACH CONCURRENTLY, DROP). The index on
the day goes: a partition holds one day. Counters of a day with no ingress partition are
never read again (the pipeline only weighs events of partitions that exist): they are not
copied.

Revision ID: 0023_caps_by_day
Revises: 0022_keys_generations
Create Date: 2026-12-05
"""

from alembic import op

revision = "0023_caps_by_day"
down_revision = "0022_keys_generations"
branch_labels = None
depends_on = None

# the partitions' name prefixes (loyalty.adapters.tables has the same values)
PREFIX = "pipeline_caps_"
INGRESS_PREFIX = "ingress_events_p"

COLUMNS = (
    "user_id VARCHAR(128) NOT NULL, event_type VARCHAR(64) NOT NULL, day DATE NOT NULL, "
    "shard INTEGER NOT NULL, count INTEGER NOT NULL"
)
"""The table's columns, both ways (as migration 0002 made them)."""

UPGRADE = [
    "ALTER TABLE pipeline_caps RENAME TO pipeline_caps_0022",
    "ALTER TABLE pipeline_caps_0022 RENAME CONSTRAINT pipeline_caps_pkey "
    "TO pipeline_caps_0022_pkey",
    "DROP INDEX pipeline_caps_day_idx",
    f"CREATE TABLE pipeline_caps ({COLUMNS}, PRIMARY KEY (user_id, event_type, day)) "
    "PARTITION BY RANGE (day)",
    f"""
    DO $$
    DECLARE
        d DATE;
    BEGIN
        FOR d IN SELECT to_date(substr(c.relname, {len(INGRESS_PREFIX) + 1}), 'YYYYMMDD')
            FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
            WHERE i.inhparent = 'ingress_events'::regclass
        LOOP
            EXECUTE format(
                'CREATE TABLE %I PARTITION OF pipeline_caps FOR VALUES FROM (%L) TO (%L)',
                '{PREFIX}' || to_char(d, 'YYYYMMDD'), d, d + 1);
        END LOOP;
    END
    $$
    """,
    """
    INSERT INTO pipeline_caps (user_id, event_type, day, shard, count)
    SELECT o.user_id, o.event_type, o.day, o.shard, o.count FROM pipeline_caps_0022 o
    WHERE EXISTS (
        SELECT 1 FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
        WHERE i.inhparent = 'pipeline_caps'::regclass
        AND c.relname = 'pipeline_caps_' || to_char(o.day, 'YYYYMMDD')
    )
    """,
    "DROP TABLE pipeline_caps_0022",
]

DOWNGRADE = [
    "ALTER TABLE pipeline_caps RENAME TO pipeline_caps_0023",
    f"CREATE TABLE pipeline_caps ({COLUMNS})",
    "INSERT INTO pipeline_caps SELECT user_id, event_type, day, shard, count "
    "FROM pipeline_caps_0023",
    "DROP TABLE pipeline_caps_0023",
    "ALTER TABLE pipeline_caps ADD PRIMARY KEY (user_id, event_type, day)",
    "CREATE INDEX pipeline_caps_day_idx ON pipeline_caps (day)",
]


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for statement in UPGRADE:
        op.execute(statement)


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for statement in DOWNGRADE:
        op.execute(statement)
