"""Database engines for both backends: SQLite (embedded default) and PostgreSQL.

One :class:`Database` per process, built by a composition root from :class:`Settings`.
``read()`` and ``write()`` hand out a connection inside a transaction; on SQLite a write
transaction starts with ``BEGIN IMMEDIATE`` so that two writers queue on the busy timeout
instead of failing when one upgrades a read lock.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, Literal

import eventsourcing.persistence as es
import psycopg
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine

from loyalty.config import Settings

SQLITE_BUSY_TIMEOUT_MS = 30_000

POOL_WAIT_SECONDS = 30
"""How long a checkout waits for a free connection of a full pool (either pool) before it
fails (the worker loops retry; the API answers 503): the budget is never exceeded."""


def connection_budget(settings: Settings) -> tuple[int, int]:
    """``LOYALTY_DB_POOL_SIZE`` (the process's total of PostgreSQL connections) split
    into (the SQLAlchemy engine's pool, the event store's one shared pool), neither with
    overflow: the engine's share also carries the process's lease session. Each pool
    needs one connection at least: a budget below 2 counts as 2."""
    total = max(2, settings.db_pool_size)
    store = max(1, total * 2 // 5)
    return max(1, total - store), store


def application_name(settings: Settings) -> str:
    """The ``application_name`` of every connection of this process (``pg_stat_activity``
    tells the processes and roles apart): ``LOYALTY_DB_APPLICATION_NAME``, which ``serve``
    sets for its worker children."""
    return settings.db_application_name


class DatabaseUnavailable(Exception):
    """The database cannot be reached or refuses work (maps to HTTP 503)."""


def _chain(exc: BaseException) -> Iterable[BaseException]:
    """The error and what it wraps (``orig`` of SQLAlchemy, causes, contexts)."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        current = todo.pop()
        if id(current) in seen or len(seen) > 16:
            continue
        seen.add(id(current))
        yield current
        for nxt in (getattr(current, "orig", None), current.__cause__, current.__context__):
            if isinstance(nxt, BaseException):
                todo.append(nxt)


def database_busy(exc: BaseException) -> bool:
    """Whether an error is the database being busy or out of reach, however wrapped:
    SQLite ``database is locked``/``busy``, a pool or lock timeout, a refused or lost
    connection, a deadlock or serialization failure (the client should retry)."""
    for error in _chain(exc):
        if isinstance(error, sqlite3.OperationalError) and (
            "locked" in str(error) or "busy" in str(error)
        ):
            return True
        if isinstance(
            error,
            psycopg.OperationalError
            | psycopg.InterfaceError
            | psycopg.errors.LockNotAvailable
            | psycopg.errors.QueryCanceled
            | psycopg.errors.SerializationFailure
            | psycopg.errors.DeadlockDetected
            | psycopg.errors.TooManyConnections
            | DatabaseUnavailable
            | sa.exc.TimeoutError
            | es.OperationalError
            | es.InterfaceError,
        ):
            return True
    return False


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take transaction control away from pysqlite; we emit BEGIN ourselves.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA secure_delete=ON")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        mode = conn.get_execution_options().get("sqlite_begin", "DEFERRED")
        conn.exec_driver_sql(f"BEGIN {mode}")


def create_engine(settings: Settings) -> Engine:
    """Build the SQLAlchemy engine for ``settings.database_url``."""
    if settings.backend == "sqlite":
        path = settings.sqlite_path
        path.parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(
            settings.sqlalchemy_url,
            pool_size=settings.db_pool_size,
            max_overflow=settings.db_pool_size,
            connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000},
        )
        _configure_sqlite(engine)
        return engine
    engine_share, _store_share = connection_budget(settings)
    return sa.create_engine(
        settings.sqlalchemy_url,
        pool_size=engine_share,
        max_overflow=0,  # the budget: wait for a connection rather than open another
        pool_pre_ping=True,
        pool_timeout=POOL_WAIT_SECONDS,
        connect_args={
            "connect_timeout": 5,
            "application_name": application_name(settings),
            "options": "-c timezone=UTC",
        },
    )


class Database:
    """The process's handle on the system-of-record database."""

    def __init__(self, settings: Settings, engine: Engine | None = None) -> None:
        self.settings = settings
        self.engine = engine if engine is not None else create_engine(settings)

    @property
    def backend(self) -> Literal["sqlite", "postgresql"]:
        return self.settings.backend

    @contextmanager
    def read(self) -> Iterator[Connection]:
        with self.engine.connect() as conn, conn.begin():
            yield conn

    @contextmanager
    def write(self) -> Iterator[Connection]:
        with self.engine.connect() as conn:
            if self.backend == "sqlite":
                conn = conn.execution_options(sqlite_begin="IMMEDIATE")
            with conn.begin():
                yield conn

    def ping(self) -> None:
        """Raise :class:`DatabaseUnavailable` unless a trivial query succeeds."""
        try:
            with self.read() as conn:
                conn.execute(sa.text("SELECT 1"))
        except sa.exc.DBAPIError as exc:
            raise DatabaseUnavailable(str(exc.orig).splitlines()[0]) from exc

    def dispose(self) -> None:
        self.engine.dispose()


# psycopg_pool (the event store's pool) replaces a lost connection after 1 s, then 2, 4,
# 8 ... s (up to its 5-minute reconnect timeout): after an outage of T seconds the next
# attempt can come T seconds after the database is back, and every checkout waits for it.
# A constant short delay instead: one failed connect per half second while it is down.
POOL_RECONNECT_DELAY = 0.5


def fast_pool_reconnect() -> None:
    """Make psycopg_pool retry a lost connection every ``POOL_RECONNECT_DELAY`` seconds
    instead of backing off exponentially (process-wide; called by the composition roots
    that build event store applications)."""
    from psycopg_pool.base import AttemptWithBackoff

    AttemptWithBackoff.INITIAL_DELAY = POOL_RECONNECT_DELAY
    AttemptWithBackoff.DELAY_BACKOFF = 1.0


def psycopg_connection(conn: Connection) -> psycopg.Connection[Any]:
    """The psycopg connection under a SQLAlchemy connection (for COPY)."""
    driver = conn.connection.driver_connection
    assert isinstance(driver, psycopg.Connection)
    return driver


def existing_tables(conn: Connection, names: Iterable[str]) -> list[str]:
    """Those of ``names`` that exist (the event store's tables are the library's: one
    name or the other per backend)."""
    return [n for n in names if sa.inspect(conn).has_table(n)]
