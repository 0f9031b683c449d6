"""Alembic environment, shared by ``loyalty migrate`` and the ``alembic`` command.

``loyalty migrate`` (``loyalty.adapters.migrate``) hands over an open connection that
holds the migration lock. Run as ``alembic ...`` from the repository root (alembic.ini),
the URL comes from :class:`loyalty.config.Settings` (``LOYALTY_DATABASE_URL``), never
from the ini, and the same lock is taken.

Autogenerate compares against our tables only: the event store's tables (the
eventsourcing library creates and owns them) and the ingress log's day partitions
(created at run time on PostgreSQL) are left out, so an autogenerate on an up-to-date
database produces an empty migration (tests/integration/test_migrations.py).
"""

from __future__ import annotations

from logging.config import fileConfig

import sqlalchemy as sa
from alembic import context

from loyalty.adapters.migrate import include_object, target_metadata
from loyalty.config import Settings


def _run(connection: sa.Connection) -> None:
    if connection.dialect.name == "sqlite" and getattr(
        context.config.cmd_opts, "autogenerate", False
    ):
        raise SystemExit(
            "autogenerate against PostgreSQL (the production schema): the SQLite statements "
            "of each migration are written by hand, with SQLite's own column types"
        )
    context.configure(
        connection=connection,
        target_metadata=target_metadata(),
        include_object=include_object,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


connection = context.config.attributes.get("connection")
if connection is not None:
    _run(connection)
else:
    from loyalty.adapters.db import Database
    from loyalty.adapters.migrate import locked_connection

    if context.config.config_file_name is not None:
        fileConfig(context.config.config_file_name, disable_existing_loggers=False)
    db = Database(Settings())
    try:
        with locked_connection(db) as conn:
            _run(conn)
            conn.commit()
    finally:
        db.dispose()
