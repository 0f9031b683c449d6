"""Bring the schema up to date, safely when several processes start at once."""

from __future__ import annotations

import fcntl
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from loyalty.adapters.db import Database
from loyalty.adapters.tables import (
    CAPS_DAY_INDEX,
    EVENT_STORE_TABLES,
    EVENT_STORE_TABLES_OF,
    INGRESS_PARTITION_PREFIX,
    KEYS_PARTITION_PREFIX,
    caps_partition_day,
)

if TYPE_CHECKING:
    from alembic.config import Config

# Alembic is imported where it is used: every CLI command and worker process migrates at
# its start, and when the schema is already current (nearly always) one read shows it
# without loading Alembic or its scripts (about a third of a command's start-up).

# The scripts are alembic/ at the top of a source checkout; a wheel (and so the image)
# carries the very same files as loyalty/migrations/ (pyproject.toml maps the directory).
PACKAGED = Path(__file__).resolve().parent.parent / "migrations"
CHECKOUT = Path(__file__).resolve().parents[2] / "alembic"
# Arbitrary constant: the advisory lock that serializes migrations on PostgreSQL.
PG_MIGRATION_LOCK = 7_304_118_275


def script_location() -> Path:
    """The Alembic script directory: the installed copy, else the checkout's alembic/."""
    for candidate in (PACKAGED, CHECKOUT):
        if (candidate / "env.py").is_file() and (candidate / "versions").is_dir():
            return candidate
    raise FileNotFoundError(f"no Alembic scripts in {PACKAGED} or {CHECKOUT}")


def include_object(
    obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any
) -> bool:
    """Autogenerate's filter (alembic/env.py): the event store's tables (the eventsourcing
    library creates and owns them) and the ingress log's day partitions (created at run
    time) and the de-duplication keys' generations and the cap counters' day partitions,
    with their indexes, are not ours to diff; nor the index on the caps' day, which only
    SQLite has (``tables.CAPS_DAY_INDEX``)."""
    table = name if type_ == "table" else getattr(getattr(obj, "table", None), "name", None)
    if type_ in ("table", "index", "unique_constraint", "foreign_key_constraint") and table:
        if (
            table in EVENT_STORE_TABLES
            or table.startswith((INGRESS_PARTITION_PREFIX, KEYS_PARTITION_PREFIX))
            or caps_partition_day(table) is not None
        ):
            return False
    if type_ == "index" and name == CAPS_DAY_INDEX and not reflected:
        return False
    return True


def target_metadata() -> sa.MetaData:
    """Every table of ours, for autogenerate: the modules that define tables on the
    shared ``metadata`` are imported here so that none is missed (and so proposed for
    dropping)."""
    import loyalty.adapters.delivery_store  # noqa: F401  (events out)
    import loyalty.adapters.erasure_store  # noqa: F401  (forget-me tables)
    import loyalty.adapters.rollup_store  # noqa: F401  (daily rollups)
    from loyalty.adapters.tables import metadata

    return metadata


def alembic_config() -> Config:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(script_location()))
    return cfg


def head_revision() -> str | None:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def newest_script() -> str:
    """The newest revision's id from the scripts' file names alone (``NNNN_name.py``,
    the id being the file's name: tests/integration/test_migrations.py checks it against
    :func:`head_revision`), without loading Alembic or any script."""
    versions = script_location() / "versions"
    return max(p.stem for p in versions.glob("[0-9][0-9][0-9][0-9]_*.py"))


def _event_tables(db: Database) -> set[str]:
    """The event store's tables ``loyalty migrate`` creates on this backend."""
    events, snapshots = EVENT_STORE_TABLES_OF[db.backend]
    return {events, snapshots} if db.settings.snapshot_interval else {events}


def up_to_date(db: Database) -> bool:
    """One read: the schema is at :func:`newest_script` and the event store's tables
    exist (no ``alembic_version`` yet, or any doubt: False, and :func:`migrate` runs)."""
    if db.backend == "sqlite":
        path = db.settings.sqlite_path
        if not path.exists() or path.stat().st_size == 0:
            # not even opened: a connection would create the file, with the engine's
            # settings, before migrate chooses incremental auto-vacuum for it
            return False
    wanted = _event_tables(db)
    listed = (
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name IN :names"
        if db.backend == "sqlite"
        else "SELECT tablename FROM pg_tables "
        "WHERE schemaname = current_schema() AND tablename IN :names"
    )
    query = sa.text(listed).bindparams(sa.bindparam("names", expanding=True))
    try:
        with db.engine.connect() as conn:
            version = conn.execute(sa.text("SELECT version_num FROM alembic_version")).all()
            found = set(conn.execute(query, {"names": sorted(wanted)}).scalars())
    except (sa.exc.OperationalError, sa.exc.ProgrammingError):
        return False  # no alembic_version table: a new database
    return version == [(newest_script(),)] and found == wanted


def current_revision(db: Database) -> str | None:
    from alembic.runtime.migration import MigrationContext

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


@contextmanager
def locked_connection(db: Database) -> Iterator[sa.Connection]:
    """A connection holding the migration lock (PostgreSQL: an advisory lock; SQLite: a
    file lock, the file prepared first). ``loyalty migrate`` and the ``alembic`` command
    (alembic/env.py) both migrate through it, so concurrent starts are serialized."""
    if db.backend == "sqlite":
        path = db.settings.sqlite_path
        with _file_lock(path.with_name(path.name + ".migrate-lock")):
            _prepare_sqlite_file(path)
            with db.engine.connect() as conn:
                yield conn
        return
    with db.engine.connect() as conn:
        conn.execute(sa.text("SELECT pg_advisory_lock(:k)"), {"k": PG_MIGRATION_LOCK})
        conn.commit()
        try:
            yield conn
        finally:
            conn.rollback()
            conn.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": PG_MIGRATION_LOCK})
            conn.commit()


def migrate(db: Database) -> str | None:
    """Upgrade to the newest revision; returns it. Idempotent and concurrency-safe (a
    schema already current is left as it is, after one read)."""
    if up_to_date(db):
        return newest_script()
    from alembic import command

    cfg = alembic_config()
    with locked_connection(db) as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
        conn.commit()
        _create_event_store_tables(db)
    return head_revision()
