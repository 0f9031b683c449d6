"""Configure the eventsourcing library's persistence from our settings.

The event store lives in the same database as our own tables: on SQLite the library's
``stored_events`` table in the same file, on PostgreSQL ``members_events`` (named after
the application). Its tables are created by ``loyalty migrate`` (under the migration
lock), never by an application starting up, so two processes cannot race to create them.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from datetime import datetime
from typing import Any, NamedTuple
from urllib.parse import unquote, urlsplit
from uuid import UUID

import orjson
import psycopg
import sqlalchemy as sa
from eventsourcing.application import Application
from eventsourcing.persistence import (
    InterfaceError,
    JSONTranscoder,
    OperationalError,
    StoredEvent,
)
from eventsourcing.postgres import PostgresApplicationRecorder
from eventsourcing.sqlite import SQLiteApplicationRecorder
from eventsourcing.utils import resolve_topic, retry
from psycopg import sql
from psycopg.rows import tuple_row

from loyalty.adapters.db import (
    POOL_WAIT_SECONDS,
    Database,
    application_name,
    connection_budget,
    existing_tables,
)
from loyalty.adapters.event_recorder import (
    APPLICATION_NAME,
    POSTGRES_FACTORY_TOPIC,
    SQLITE_FACTORY_TOPIC,
)
from loyalty.adapters.event_recorder import SQLITE_TOPIC as SQLITE_RECORDER_TOPIC
from loyalty.adapters.event_recorder import TOPIC as RECORDER_TOPIC
from loyalty.adapters.tables import EVENT_STORE_TABLES
from loyalty.application.delivery.feed import (
    BOOKKEEPING,
    TOMBSTONE,
    Decoded,
    NotificationSelect,
    PlainDecoder,
    library_select,
)
from loyalty.config import Settings
from loyalty.domain.member import Member

STREAM_TABLES = tuple(sorted(EVENT_STORE_TABLES))
"""The library's tables of a member's stream (one pair per backend)."""
NIL_HEX = uuid.UUID(int=0).hex


def event_store_env(settings: Settings, *, create_table: bool = False) -> dict[str, str]:
    common = {
        "CREATE_TABLE": "y" if create_table else "n",
        "AGGREGATE_CACHE_MAXSIZE": str(settings.aggregate_cache_size),
        "SNAPSHOT_INTERVAL": str(settings.snapshot_interval),
    }
    if settings.backend == "sqlite":
        return {
            **common,
            "PERSISTENCE_MODULE": SQLITE_FACTORY_TOPIC,
            "SQLITE_DBNAME": str(settings.sqlite_path),
            "SQLITE_LOCK_TIMEOUT": "30",
            "APPLICATION_RECORDER_TOPIC": SQLITE_RECORDER_TOPIC,
        }
    url = urlsplit(settings.database_url)
    _engine_share, store_share = connection_budget(settings)
    return {
        **common,
        "PERSISTENCE_MODULE": POSTGRES_FACTORY_TOPIC,
        "POSTGRES_DBNAME": unquote(url.path.lstrip("/")),
        "POSTGRES_HOST": url.hostname or "127.0.0.1",
        "POSTGRES_PORT": str(url.port or 5432),
        "POSTGRES_USER": unquote(url.username or "postgres"),
        "POSTGRES_PASSWORD": unquote(url.password or ""),
        # The event store's share of the process's budget, in ONE pool per process that
        # every application built with these settings shares (GuardedPostgresFactory):
        # no overflow, and a checkout waits for a free connection (psycopg_pool's
        # "timeout", which the library names CONNECT_TIMEOUT) as long as the engine's.
        "POSTGRES_POOL_SIZE": str(store_share),
        "POSTGRES_MAX_OVERFLOW": "0",
        "POSTGRES_CONNECT_TIMEOUT": str(POOL_WAIT_SECONDS),
        APPLICATION_NAME: application_name(settings),
        "POSTGRES_LOCK_TIMEOUT": "10",
        # No ping per checkout: with it, psycopg_pool backs off between the dead
        # connections it finds after a restart (measured slower). A statement on a dead
        # connection is retried by the library, and the worker loops replace every dead
        # connection of the pool at their first error (loyalty.bootstrap.drop_dead_connections).
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


def stream_loader(
    recorder: Any, snapshot_recorder: Any = None, *, first_only: bool = False
) -> Callable[[Sequence[UUID]], list[StoredEvent]]:
    """Read many aggregates' stored events in one query (the library reads one stream
    per query). Events come ordered by aggregate, then version. With the snapshot store's
    recorder, each aggregate's latest snapshot comes first (a ``Snapshot`` whose
    ``mutate`` builds the aggregate) and only the events after it follow, as the
    library's repository loads; snapshot and events are read in one statement.
    ``first_only`` (no snapshots): only each aggregate's first event (version 1, the one
    naming a member's user id: the feed's lookup)."""
    if first_only and snapshot_recorder is not None:
        raise ValueError("first_only reads the events table alone")
    first = " AND originator_version = 1" if first_only else ""
    if isinstance(recorder, PostgresApplicationRecorder):
        schema = sql.Identifier(recorder.datastore.schema)
        events = sql.Identifier(recorder.events_table_name)
        if snapshot_recorder is None:
            statement = sql.SQL(
                "SELECT originator_id, originator_version, topic, state FROM {}.{} "
                "WHERE originator_id = ANY(%(ids)s)" + first + " "
                "ORDER BY originator_id, originator_version"
            ).format(schema, events)
        else:
            statement = sql.SQL(
                "WITH s AS (SELECT DISTINCT ON (originator_id) originator_id, "
                "originator_version, topic, state FROM {schema}.{snapshots} "
                "WHERE originator_id = ANY(%(ids)s) "
                "ORDER BY originator_id, originator_version DESC) "
                "SELECT originator_id, originator_version, topic, state FROM s "
                "UNION ALL "
                "SELECT e.originator_id, e.originator_version, e.topic, e.state "
                "FROM {schema}.{events} e LEFT JOIN s ON s.originator_id = e.originator_id "
                "WHERE e.originator_id = ANY(%(ids)s) "
                "AND e.originator_version > coalesce(s.originator_version, 0) "
                "ORDER BY 1, 2"
            ).format(
                schema=schema,
                events=events,
                snapshots=sql.Identifier(snapshot_recorder.events_table_name),
            )

        def load_pg(ids: Sequence[UUID]) -> list[StoredEvent]:
            with recorder.datastore.get_connection() as conn, conn.cursor() as curs:
                curs.execute(statement, {"ids": list(ids)})
                return [
                    StoredEvent(
                        r["originator_id"], r["originator_version"], r["topic"], bytes(r["state"])
                    )
                    for r in curs.fetchall()
                ]

        return load_pg
    if isinstance(recorder, SQLiteApplicationRecorder):
        table = recorder.events_table_name
        snapshots = snapshot_recorder.events_table_name if snapshot_recorder else None

        def load_sqlite(ids: Sequence[UUID]) -> list[StoredEvent]:
            marks = ",".join("?" * len(ids))
            hex_ids = [i.hex for i in ids]
            if snapshots is None:
                query = (
                    f"SELECT originator_id, originator_version, topic, state FROM {table} "
                    f"WHERE originator_id IN ({marks}){first} "
                    "ORDER BY originator_id, originator_version"
                )
                params = hex_ids
            else:
                query = (
                    f"WITH s AS (SELECT originator_id, max(originator_version) AS v "
                    f"FROM {snapshots} WHERE originator_id IN ({marks}) GROUP BY originator_id) "
                    f"SELECT n.originator_id, n.originator_version, n.topic, n.state "
                    f"FROM {snapshots} n JOIN s ON n.originator_id = s.originator_id "
                    f"AND n.originator_version = s.v "
                    f"UNION ALL "
                    f"SELECT e.originator_id, e.originator_version, e.topic, e.state "
                    f"FROM {table} e LEFT JOIN s ON s.originator_id = e.originator_id "
                    f"WHERE e.originator_id IN ({marks}) "
                    f"AND e.originator_version > coalesce(s.v, 0) "
                    f"ORDER BY 1, 2"
                )
                params = hex_ids + hex_ids
            with recorder.datastore.transaction(commit=False) as curs:
                curs.execute(query, params)
                return [StoredEvent(UUID(r[0]), r[1], r[2], r[3]) for r in curs.fetchall()]

        return load_sqlite
    raise TypeError(f"no bulk loader for {type(recorder).__name__}")


class LogRow(NamedTuple):
    """A notification as the ways out read it: the library's ``Notification`` fields,
    the stream's id as its text (what every way out carries; a mapper takes it as well)."""

    id: int
    originator_id: str
    originator_version: int
    topic: str
    state: bytes


def notification_reader(recorder: Any) -> NotificationSelect:
    """``select(after, limit, stop)``: the notifications after ``after`` up to ``stop``
    (inclusive), at most ``limit``, in id order: what ``select_notifications(after,
    limit, stop=stop, inclusive_of_start=False)`` reads. On PostgreSQL one statement in
    binary, tuple rows, the stream id as text: 1.5 µs a row against the library's
    5.2-6.5 µs (dict rows, a ``UUID`` and a ``Notification`` each), most of what the
    feed spent reading the log. Retried on a dead connection as the library retries."""
    if not isinstance(recorder, PostgresApplicationRecorder):
        return library_select(recorder)
    datastore = recorder.datastore
    statement = sql.SQL(
        "SELECT notification_id, originator_id::text, originator_version, topic, state "
        "FROM {}.{} WHERE notification_id > %s AND notification_id <= %s "
        "ORDER BY notification_id LIMIT %s"
    ).format(sql.Identifier(datastore.schema), sql.Identifier(recorder.events_table_name))

    @retry((InterfaceError, OperationalError), max_attempts=10, wait=0.2)
    def select_pg(after: int, limit: int, stop: int) -> Sequence[Any]:
        with datastore.get_connection() as conn, conn.cursor(row_factory=tuple_row) as curs:
            curs.execute(statement, (after, stop, limit), prepare=True, binary=True)
            return [LogRow._make(row) for row in curs.fetchall()]

    reader: NotificationSelect = select_pg  # (the library's retry is untyped)
    return reader


_PLAIN = frozenset({str, int, bool, float, type(None)})


def plain_decoder(app: Application[Any]) -> PlainDecoder | None:
    """The feed's decoder of a stored member event straight from its JSON (orjson, no
    event object: the mapper's decode and the fields' conversion were most of a feed
    read), upcast as the mapper upcasts; None for a stored ``Enrolled`` (its parts are
    built by the domain) or a field that is not a plain JSON value (the transcoder
    encoded it): the mapper then decodes that one. None (no decoder at all) when the
    mapper compresses or encrypts."""
    mapper = app.mapper
    if mapper.cipher is not None or mapper.compressor is not None:
        return None
    if type(mapper.transcoder) is not JSONTranscoder:
        return None

    classes: dict[str, tuple[type[Any], str, int]] = {}  # topic -> class, name, version

    def decode(stored: Any) -> Decoded | None:
        found = classes.get(stored.topic)
        if found is None:
            cls = resolve_topic(stored.topic)
            found = classes[stored.topic] = (cls, cls.__name__, getattr(cls, "class_version", 1))
        cls, name, target = found
        if cls is Member.Enrolled:
            return None
        state = orjson.loads(stored.state)
        stamp = state.pop("timestamp", None)
        if type(stamp) is not dict or stamp.get("_type_") != "datetime_iso":
            return None
        version = state.pop("class_version", 1)
        while version < target:
            getattr(cls, f"upcast_v{version}_v{version + 1}")(state)
            version += 1
        if not _PLAIN.issuperset(map(type, state.values())):  # C-level: no loop in Python
            return None
        for key in BOOKKEEPING.intersection(state):
            del state[key]
        return name, state, datetime.fromisoformat(stamp["_data_"])

    return decode


def stream_connection(app: Application[Any]) -> AbstractContextManager[psycopg.Connection[Any]]:
    """A connection of the event store's pool (PostgreSQL; autocommit): for a read beside
    a stream's, on the connections that read streams, with no ping or transaction."""
    recorder = app.recorder
    if not isinstance(recorder, PostgresApplicationRecorder):
        raise TypeError(f"no connection pool in {type(recorder).__name__}")
    return recorder.datastore.get_connection()


def erase_stream(db: Database, member_id: str) -> int:
    """Delete a member's stream (events and snapshots); returns the rows deleted. Takes
    the lock the event insert takes, so a concurrent save either commits first (and is
    deleted too) or finds its predecessor gone (``loyalty.adapters.event_recorder``)."""
    erased = 0
    with db.write() as conn:
        tables = existing_tables(conn, STREAM_TABLES)
        if db.backend == "postgresql":
            for table in tables:
                result = conn.execute(
                    sa.text(f'DELETE FROM "{table}" WHERE originator_id = :m'),
                    {"m": uuid.UUID(member_id)},
                )
                erased += int(result.rowcount)
            return erased
        for table in tables:
            hex_id = uuid.UUID(member_id).hex
            if table.endswith("_snapshots"):
                # The library's snapshot table is WITHOUT ROWID and read by
                # (originator_id, version) only: no position to keep.
                result = conn.execute(
                    sa.text(f"DELETE FROM {table} WHERE originator_id = :m"), {"m": hex_id}
                )
                erased += int(result.rowcount)
                continue
            top = conn.execute(sa.text(f"SELECT max(rowid) FROM {table}")).scalar()
            result = conn.execute(
                sa.text(f"DELETE FROM {table} WHERE originator_id = :m"), {"m": hex_id}
            )
            erased += int(result.rowcount)
            after = conn.execute(sa.text(f"SELECT max(rowid) FROM {table}")).scalar()
            if top is not None and (after is None or after < top):
                # The library's table has no AUTOINCREMENT: keep the highest rowid
                # taken, so it is never handed out again and a reader that has seen
                # it cannot skip a new event.
                conn.execute(
                    sa.text(
                        f"INSERT INTO {table} (rowid, originator_id, originator_version, "
                        "topic, state) VALUES (:r, :nil, :r, :topic, x'')"
                    ),
                    {"r": top, "nil": NIL_HEX, "topic": TOMBSTONE},
                )
                conn.execute(
                    sa.text(f"DELETE FROM {table} WHERE originator_id = :nil AND rowid < :r"),
                    {"nil": NIL_HEX, "r": top},
                )
    return erased
