"""Conflicting duplicates: a content fingerprint kept with each de-duplication key.

PostgreSQL: ``ingress_keys.fingerprint`` (a 64-bit hash of user_id, type, occurred_at
and the attributes, chained through PostgreSQL's extended hash functions, the ones hash
partitioning relies on, so stable across versions; ``jsonb_hash_extended`` hashes the
jsonb value, so key order and spacing do not matter), written by the key trigger and by
the ingest fallback, so that a resend of a stored event id with other
content is told from a repeat (the fallback compares fingerprints; the partition of the
stored row need not be scanned). Keys stored before this migration have none (NULL: not
known to conflict). SQLite: the stored row is in the same table as its key (UNIQUE
(source, event_id)) and is compared directly: nothing to do.

Revision ID: 0018_contract
Revises: 0017_operator
"""

from alembic import op

revision = "0018_contract"
down_revision = "0017_operator"
branch_labels = None
depends_on = None

UPGRADE = [
    "ALTER TABLE ingress_keys ADD COLUMN fingerprint BIGINT",
    """
    CREATE FUNCTION ingress_fingerprint(
        user_id TEXT, type TEXT, occurred_at TIMESTAMPTZ, attributes JSONB
    ) RETURNS BIGINT LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
        SELECT hashtextextended(user_id || chr(31) || type, jsonb_hash_extended(
            attributes, timestamp_hash_extended(occurred_at AT TIME ZONE 'UTC', 0)))
    $$
    """,
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
]

DOWNGRADE = [
    """
    CREATE OR REPLACE FUNCTION ingress_keys_record() RETURNS trigger LANGUAGE plpgsql AS $$
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
    "DROP FUNCTION ingress_fingerprint(TEXT, TEXT, TIMESTAMPTZ, JSONB)",
    "ALTER TABLE ingress_keys DROP COLUMN fingerprint",
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
