"""De-duplication keys in generations of receipt days, dropped whole (issue 30).

PostgreSQL only. ``ingress_keys`` was one table keyed (source, event_id): retention
deleted a day's keys row by row (most of ``expire_day``) and their pages stayed with the
table. Now it is partitioned by ``day``, the UTC day the key was *received* (the
database's clock), in generations of eight days (``ingress_keys_generation``); each
generation's partition has its own UNIQUE (source, event_id). A key is stored in the
current generation, and the batch fails as a duplicate if the key is there already (the
unique index: also against a batch in flight) or in an older generation still kept (one
probe per key and kept older generation: one in the steady state of a 7-day window). Per
generation rather than per day, because each kept partition costs every ingested key a
probe (measured: seven day partitions made recording a batch's keys 3.6 times dearer).

At a generation's start a batch still in flight in the previous one is not visible to
the probe. ``ingress_keys_enter`` closes that: every batch holds its generation's lock
shared (a transaction-level advisory lock), and each session's first batch of a
generation takes the previous generation's lock exclusively once (then releases it), so
it waits for the previous generation's batches in flight; a batch whose generation
changed while it took its lock fails with a serialization failure (the caller retries).

Retention drops a generation's partition (DETACH CONCURRENTLY, DROP) once every day its
keys could belong to has expired and no expired day was kept for unprocessed events.
The partitions are created ahead by the ingest path (``loyalty.adapters.ingress_log``).
Keys stored before this revision keep their day (the day their event occurred, at most
today) and go to that day's generation.

Revision ID: 0022_keys_generations
Revises: 0021_contract2
Create Date: 2026-12-05
"""

from alembic import op

revision = "0022_keys_generations"
down_revision = "0021_contract2"
branch_labels = None
depends_on = None

# the partitions' name prefix, the epoch and length of a generation, the advisory lock
# namespace (loyalty.adapters.ingress_log has the same values)
PREFIX = "ingress_keys_g"
EPOCH = "2000-01-03"
DAYS = 8
LOCK_NS = 7_304_119

UPGRADE = [
    "ALTER TABLE ingress_keys RENAME TO ingress_keys_0021",
    "ALTER TABLE ingress_keys_0021 RENAME CONSTRAINT ingress_keys_pkey TO ingress_keys_0021_pkey",
    """
    CREATE TABLE ingress_keys (
        source VARCHAR(128) NOT NULL,
        event_id VARCHAR(128) NOT NULL,
        day DATE NOT NULL,
        fingerprint BIGINT
    ) PARTITION BY RANGE (day)
    """,
    f"""
    CREATE FUNCTION ingress_keys_generation(d DATE) RETURNS DATE
    LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
        SELECT d - ((d - DATE '{EPOCH}') % {DAYS})
    $$
    """,
    f"""
    CREATE FUNCTION ingress_keys_enter() RETURNS DATE LANGUAGE plpgsql VOLATILE AS $$
    DECLARE
        d DATE := (clock_timestamp() AT TIME ZONE 'UTC')::date;
        g DATE := ingress_keys_generation(d);
    BEGIN
        PERFORM pg_advisory_xact_lock_shared({LOCK_NS}, g - DATE '{EPOCH}');
        IF ingress_keys_generation((clock_timestamp() AT TIME ZONE 'UTC')::date) <> g THEN
            RAISE EXCEPTION 'a new generation of ingest keys began: retry'
                USING ERRCODE = 'serialization_failure';
        END IF;
        IF current_setting('loyalty.keys_generation', true) IS DISTINCT FROM g::text THEN
            PERFORM pg_advisory_lock({LOCK_NS}, g - {DAYS} - DATE '{EPOCH}');
            PERFORM pg_advisory_unlock({LOCK_NS}, g - {DAYS} - DATE '{EPOCH}');
            PERFORM set_config('loyalty.keys_generation', g::text, false);
        END IF;
        RETURN d;
    END
    $$
    """,
    # ``loyalty.keys_recorded`` is set (SET LOCAL) by the ingest fallback, which records
    # the keys itself (INSERT ... ON CONFLICT DO NOTHING) and inserts only the new rows.
    # Nested loops: the transition table's size is unknown to the planner, and a hash
    # join would read every key of the older generations.
    """
    CREATE OR REPLACE FUNCTION ingress_keys_record() RETURNS trigger LANGUAGE plpgsql
    SET enable_hashjoin = off SET enable_mergejoin = off AS $$
    DECLARE
        d DATE;
    BEGIN
        IF current_setting('loyalty.keys_recorded', true) = 'on' THEN
            RETURN NULL;
        END IF;
        d := ingress_keys_enter();
        INSERT INTO ingress_keys (source, event_id, day, fingerprint)
        SELECT source, event_id, d, ingress_fingerprint(user_id, type, occurred_at, attributes)
        FROM new_rows;
        IF EXISTS (
            SELECT 1 FROM new_rows n JOIN ingress_keys k
            ON k.source = n.source AND k.event_id = n.event_id
            WHERE k.day < ingress_keys_generation(d)
        ) THEN
            RAISE EXCEPTION 'duplicate key value: stored in an earlier generation'
                USING ERRCODE = 'unique_violation';
        END IF;
        RETURN NULL;
    END
    $$
    """,
    f"""
    DO $$
    DECLARE
        g DATE;
        name TEXT;
    BEGIN
        FOR g IN SELECT DISTINCT ingress_keys_generation(day) FROM (
            SELECT LEAST(day, (now() AT TIME ZONE 'UTC')::date) AS day FROM ingress_keys_0021
            UNION SELECT (now() AT TIME ZONE 'UTC')::date
        ) d LOOP
            name := '{PREFIX}' || to_char(g, 'YYYYMMDD');
            EXECUTE format(
                'CREATE TABLE %I PARTITION OF ingress_keys FOR VALUES FROM (%L) TO (%L)',
                name, g, g + {DAYS});
            EXECUTE format('CREATE UNIQUE INDEX %I ON %I (source, event_id)', name || '_key', name);
        END LOOP;
    END
    $$
    """,
    """
    INSERT INTO ingress_keys (source, event_id, day, fingerprint)
    SELECT source, event_id, LEAST(day, (now() AT TIME ZONE 'UTC')::date), fingerprint
    FROM ingress_keys_0021
    """,
    "DROP TABLE ingress_keys_0021",
]

DOWNGRADE = [
    "ALTER TABLE ingress_keys RENAME TO ingress_keys_0022",
    """
    CREATE TABLE ingress_keys (
        source VARCHAR(128) NOT NULL,
        event_id VARCHAR(128) NOT NULL,
        day DATE NOT NULL,
        fingerprint BIGINT,
        PRIMARY KEY (source, event_id)
    )
    """,
    """
    INSERT INTO ingress_keys (source, event_id, day, fingerprint)
    SELECT source, event_id, day, fingerprint FROM ingress_keys_0022
    ON CONFLICT DO NOTHING
    """,
    "DROP TABLE ingress_keys_0022",
    """
    CREATE OR REPLACE FUNCTION ingress_keys_record() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF current_setting('loyalty.keys_recorded', true) = 'on' THEN
            RETURN NULL;
        END IF;
        INSERT INTO ingress_keys (source, event_id, day, fingerprint)
        SELECT source, event_id, (occurred_at AT TIME ZONE 'UTC')::date,
            ingress_fingerprint(user_id, type, occurred_at, attributes)
        FROM new_rows;
        RETURN NULL;
    END
    $$
    """,
    "ALTER FUNCTION ingress_keys_record() RESET ALL",
    "DROP FUNCTION ingress_keys_enter()",
    "DROP FUNCTION ingress_keys_generation(DATE)",
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
