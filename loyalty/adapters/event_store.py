"""Configure the eventsourcing library's persistence from our settings.

The event store lives in the same database as our own tables: on SQLite the library's
``stored_events`` table in the same file, on PostgreSQL ``members_events`` (named after
the application). Its tables are created by ``loyalty migrate`` (under the migration
lock), never by an application starting up, so two processes cannot race to create them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import unquote, urlsplit
from uuid import UUID

from eventsourcing.persistence import StoredEvent
from eventsourcing.postgres import PostgresApplicationRecorder
from eventsourcing.sqlite import SQLiteApplicationRecorder
from psycopg import sql

from loyalty.adapters.event_recorder import SQLITE_TOPIC as SQLITE_RECORDER_TOPIC
from loyalty.adapters.event_recorder import TOPIC as RECORDER_TOPIC
from loyalty.config import Settings


def event_store_env(settings: Settings, *, create_table: bool = False) -> dict[str, str]:
    common = {
        "CREATE_TABLE": "y" if create_table else "n",
        "AGGREGATE_CACHE_MAXSIZE": str(settings.aggregate_cache_size),
    }
    if settings.backend == "sqlite":
        return {
            **common,
            "PERSISTENCE_MODULE": "eventsourcing.sqlite",
            "SQLITE_DBNAME": str(settings.sqlite_path),
            "SQLITE_LOCK_TIMEOUT": "30",
            "APPLICATION_RECORDER_TOPIC": SQLITE_RECORDER_TOPIC,
        }
    url = urlsplit(settings.database_url)
    return {
        **common,
        "PERSISTENCE_MODULE": "eventsourcing.postgres",
        "POSTGRES_DBNAME": unquote(url.path.lstrip("/")),
        "POSTGRES_HOST": url.hostname or "127.0.0.1",
        "POSTGRES_PORT": str(url.port or 5432),
        "POSTGRES_USER": unquote(url.username or "postgres"),
        "POSTGRES_PASSWORD": unquote(url.password or ""),
        "POSTGRES_POOL_SIZE": str(settings.db_pool_size),
        "POSTGRES_MAX_OVERFLOW": str(settings.db_pool_size),
        "POSTGRES_CONNECT_TIMEOUT": "5",
        "POSTGRES_LOCK_TIMEOUT": "10",
        # No ping per checkout: the library retries a dead connection by itself.
        "POSTGRES_PRE_PING": "n",
        "APPLICATION_RECORDER_TOPIC": RECORDER_TOPIC,
    }


def worker_env(settings: Settings) -> dict[str, str]:
    """The worker is the main writer of awards: it trusts its cache (no read per award)
    and relies on optimistic concurrency to notice a member changed elsewhere."""
    return {
        **event_store_env(settings),
        "AGGREGATE_CACHE_FASTFORWARD": "n",
        "DEEPCOPY_FROM_AGGREGATE_CACHE": "n",
    }


def stream_loader(recorder: Any) -> Callable[[Sequence[UUID]], list[StoredEvent]]:
    """Read many aggregates' stored events in one query (the library reads one stream
    per query). Events come ordered by aggregate, then version."""
    if isinstance(recorder, PostgresApplicationRecorder):
        statement = sql.SQL(
            "SELECT originator_id, originator_version, topic, state FROM {}.{} "
            "WHERE originator_id = ANY(%s) ORDER BY originator_id, originator_version"
        ).format(
            sql.Identifier(recorder.datastore.schema), sql.Identifier(recorder.events_table_name)
        )

        def load_pg(ids: Sequence[UUID]) -> list[StoredEvent]:
            with recorder.datastore.get_connection() as conn, conn.cursor() as curs:
                curs.execute(statement, (list(ids),))
                return [
                    StoredEvent(
                        r["originator_id"], r["originator_version"], r["topic"], bytes(r["state"])
                    )
                    for r in curs.fetchall()
                ]

        return load_pg
    if isinstance(recorder, SQLiteApplicationRecorder):
        table = recorder.events_table_name

        def load_sqlite(ids: Sequence[UUID]) -> list[StoredEvent]:
            marks = ",".join("?" * len(ids))
            with recorder.datastore.transaction(commit=False) as curs:
                curs.execute(
                    f"SELECT originator_id, originator_version, topic, state FROM {table} "
                    f"WHERE originator_id IN ({marks}) ORDER BY originator_id, originator_version",
                    [i.hex for i in ids],
                )
                return [StoredEvent(UUID(r[0]), r[1], r[2], r[3]) for r in curs.fetchall()]

        return load_sqlite
    raise TypeError(f"no bulk loader for {type(recorder).__name__}")
