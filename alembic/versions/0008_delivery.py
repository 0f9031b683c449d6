"""Events out: webhook subscriptions, delivery cursors, dead letters.

Revision ID: 0008
Revises: 0006
Create Date: 2026-11-29
"""

from alembic import op

revision = "0008"
down_revision = "0006"  # issue 17 was briefed on "0004"; re-chained here after merging main
branch_labels = None
depends_on = None

STATEMENTS = [
    # An operator's subscription: where to send which event types, and the signing
    # secret (kept to sign; shown once at creation). No member data.
    """
    CREATE TABLE webhook_subscriptions (
        subscription_id VARCHAR(32) PRIMARY KEY,
        url TEXT NOT NULL,
        event_types TEXT NOT NULL,
        secret VARCHAR(128) NOT NULL,
        created_at TIMESTAMP WITH TIME ZONE NOT NULL
    )
    """,
    # One durable position in the account event log per way out ("webhook:<id>",
    # "relay"): a notification id, advanced only after what precedes it was delivered.
    """
    CREATE TABLE delivery_cursors (
        name VARCHAR(64) PRIMARY KEY,
        position BIGINT NOT NULL,
        updated_at TIMESTAMP WITH TIME ZONE NOT NULL
    )
    """,
    # Deliveries that failed for the whole retry period; replayed or deleted by an
    # operator, erased by forget-me (user_id).
    """
    CREATE TABLE webhook_dead_letters (
        letter_id VARCHAR(32) PRIMARY KEY,
        subscription_id VARCHAR(32) NOT NULL,
        event_id VARCHAR(64) NOT NULL,
        position BIGINT NOT NULL,
        user_id VARCHAR(128) NOT NULL,
        event_type VARCHAR(64) NOT NULL,
        payload TEXT NOT NULL,
        attempts INTEGER NOT NULL,
        last_error TEXT NOT NULL,
        failed_at TIMESTAMP WITH TIME ZONE NOT NULL
    )
    """,
    "CREATE INDEX webhook_dead_letters_sub_idx ON webhook_dead_letters (subscription_id)",
    "CREATE INDEX webhook_dead_letters_user_idx ON webhook_dead_letters (user_id)",
    # member.forgotten notices, one row per durable way out that must tell its
    # subscribers; the row (the only copy of the user id left) is deleted once delivered.
    """
    CREATE TABLE delivery_notices (
        notice_id VARCHAR(64) PRIMARY KEY,
        channel VARCHAR(64) NOT NULL,
        event_id VARCHAR(64) NOT NULL,
        user_id VARCHAR(128) NOT NULL,
        occurred_at TIMESTAMP WITH TIME ZONE NOT NULL
    )
    """,
    "CREATE INDEX delivery_notices_channel_idx ON delivery_notices (channel)",
]


# A new key role, "feed" (reads GET /v1/feed). PostgreSQL replaces the CHECK constraint;
# SQLite cannot alter one, so the (small) table is rebuilt with the same columns.
def _roles_check(roles: tuple[str, ...]) -> str:
    return "role IN (" + ", ".join(f"'{r}'" for r in roles) + ")"


ROLES = ("ingest", "shop", "operator", "feed")
OLD_ROLES = ("ingest", "shop", "operator")


def _set_roles(roles: tuple[str, ...]) -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE api_keys DROP CONSTRAINT IF EXISTS api_keys_role_check")
        op.execute(
            f"ALTER TABLE api_keys ADD CONSTRAINT api_keys_role_check CHECK ({_roles_check(roles)})"
        )
        return
    op.execute(
        f"""
        CREATE TABLE api_keys_new (
            key_id VARCHAR(32) PRIMARY KEY,
            name VARCHAR(128) NOT NULL,
            role VARCHAR(16) NOT NULL CHECK ({_roles_check(roles)}),
            secret_hash VARCHAR(64) NOT NULL,
            created_at TIMESTAMP WITH TIME ZONE NOT NULL,
            revoked_at TIMESTAMP WITH TIME ZONE
        )
        """
    )
    op.execute(
        "INSERT INTO api_keys_new (key_id, name, role, secret_hash, created_at, revoked_at) "
        "SELECT key_id, name, role, secret_hash, created_at, revoked_at FROM api_keys"
    )
    op.execute("DROP TABLE api_keys")
    op.execute("ALTER TABLE api_keys_new RENAME TO api_keys")


def upgrade() -> None:
    for statement in STATEMENTS:
        op.execute(statement)
    _set_roles(ROLES)


def downgrade() -> None:
    op.execute("DELETE FROM api_keys WHERE role = 'feed'")
    _set_roles(OLD_ROLES)
    for table in (
        "delivery_notices",
        "webhook_dead_letters",
        "delivery_cursors",
        "webhook_subscriptions",
    ):
        op.execute(f"DROP TABLE {table}")
