"""Bring the schema up to date, safely when several processes start at once."""

from __future__ import annotations

import fcntl
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from loyalty.adapters.db import Database

MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"
# Arbitrary constant: the advisory lock that serializes migrations on PostgreSQL.
PG_MIGRATION_LOCK = 7_304_118_275


def alembic_config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    return cfg


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def current_revision(db: Database) -> str | None:
    with db.engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _prepare_sqlite_file(path: Path) -> None:
    """Incremental auto-vacuum must be chosen before the first table exists."""
    conn = sqlite3.connect(path)
    try:
        (tables,) = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        if tables == 0:
            conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
            conn.execute("PRAGMA journal_mode=WAL")
    finally:
        conn.close()


def _create_event_store_tables(db: Database) -> None:
    """The eventsourcing library's own tables (CREATE ... IF NOT EXISTS), under our lock."""
    from loyalty.adapters.event_store import event_store_env
    from loyalty.application.accounts import Members

    Members(env=event_store_env(db.settings, create_table=True)).close()


def migrate(db: Database) -> str | None:
    """Upgrade to the newest revision; returns it. Idempotent and concurrency-safe."""
    cfg = alembic_config()
    if db.backend == "sqlite":
        path = db.settings.sqlite_path
        with _file_lock(path.with_name(path.name + ".migrate-lock")):
            _prepare_sqlite_file(path)
            with db.engine.connect() as conn:
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, "head")
                conn.commit()
            _create_event_store_tables(db)
    else:
        with db.engine.connect() as conn:
            conn.execute(sa.text("SELECT pg_advisory_lock(:k)"), {"k": PG_MIGRATION_LOCK})
            conn.commit()
            try:
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, "head")
                conn.commit()
                _create_event_store_tables(db)
            finally:
                conn.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": PG_MIGRATION_LOCK})
                conn.commit()
    return head_revision()
