"""Exactly once across day partitions: one dedup key per (source, event_id).

PostgreSQL's ingress log is partitioned by day, and a unique index of a partitioned table
must contain the partition key: each day's partition could only de-duplicate its own day,
so a resend stamped after midnight was stored (and awarded) twice. ``ingress_keys`` holds
one row per stored event, filled by a statement-level trigger from the statement's
transition table (the common case stays one COPY: a duplicate fails it, and the caller
falls back to inserting only the new keys' rows). Retention deletes a day's keys in the
transaction that drops its partition, so de-duplication holds for the retention window.
SQLite's ingress log is one table with a UNIQUE (source, event_id): nothing to do.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-29
"""

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

POSTGRES = [
    """
    CREATE TABLE ingress_keys (
        source VARCHAR(128) NOT NULL,
        event_id VARCHAR(128) NOT NULL,
        day DATE NOT NULL,
        PRIMARY KEY (source, event_id)
    )
    """,
    # ``loyalty.keys_recorded`` is set (SET LOCAL) by the ingest fallback, which records
    # the keys itself (INSERT ... ON CONFLICT DO NOTHING) and inserts only the new rows.
    """
    CREATE FUNCTION ingress_keys_record() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF current_setting('loyalty.keys_recorded', true) = 'on' THEN
            RETURN NULL;
        END IF;
        INSERT INTO ingress_keys (source, event_id, day)
        SELECT source, event_id, (occurred_at AT TIME ZONE 'UTC')::date FROM new_rows;
        RETURN NULL;
    END
    $$
    """,
    """
    CREATE TRIGGER ingress_keys_record AFTER INSERT ON ingress_events
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT
    EXECUTE FUNCTION ingress_keys_record()
    """,
    """
    INSERT INTO ingress_keys (source, event_id, day)
    SELECT source, event_id, (occurred_at AT TIME ZONE 'UTC')::date FROM ingress_events
    ON CONFLICT DO NOTHING
    """,
]


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for statement in POSTGRES:
        op.execute(statement)


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("DROP TRIGGER ingress_keys_record ON ingress_events")
    op.execute("DROP FUNCTION ingress_keys_record()")
    op.execute("DROP TABLE ingress_keys")
