"""Alembic environment. The URL comes from :class:`loyalty.config.Settings` unless the
caller (``loyalty.adapters.migrate``) hands over an open connection."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import context

from loyalty.adapters.tables import EVENT_STORE_TABLES, INGRESS_PARTITION_PREFIX, metadata
from loyalty.config import Settings


def include_object(
    obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any
) -> bool:
    """Keep the event store's tables and the run-time day partitions out of autogenerate."""
    if type_ == "table" and name is not None:
        if name in EVENT_STORE_TABLES or name.startswith(INGRESS_PARTITION_PREFIX):
            return False
    return True


def _run(connection: sa.Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        include_object=include_object,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


connection = context.config.attributes.get("connection")
if connection is not None:
    _run(connection)
else:
    engine = sa.create_engine(Settings().sqlalchemy_url, poolclass=sa.pool.NullPool)
    with engine.connect() as conn:
        _run(conn)
        conn.commit()
