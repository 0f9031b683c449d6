"""The eventsourcing library's own recorder test cases, run against our subclasses of its
PostgreSQL and SQLite application recorders (``loyalty.adapters.event_recorder``):
inserts, selects, notification ids in order and without interleaving, concurrency, both
id types (the SQLite one also with the forget-markers table present, so the erasure
guard's checks run on every insert). And our event store is wired to them."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from eventsourcing.persistence import StoredEvent
from eventsourcing.postgres import PostgresDatastore
from eventsourcing.sqlite import SQLiteDatastore
from eventsourcing.tests.persistence import (
    ApplicationRecorderTestCase,
    NonInterleavingNotificationIDsBaseCase,
)

from loyalty.adapters.event_recorder import (
    GuardedSQLiteApplicationRecorder,
    JsonInsertApplicationRecorder,
)
from loyalty.adapters.event_store import event_store_env
from loyalty.application.accounts import Members
from loyalty.config import Settings

TABLE = "recorder_events"


@pytest.fixture(scope="module")
def recorder_db(pg_admin_url: str) -> Iterator[str]:
    name = f"loyalty_recorder_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(pg_admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield name
    with psycopg.connect(pg_admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class _OnOurRecorder:
    """Each test gets a recorder on an empty table of a database of its own."""

    id_type = "uuid"
    datastores: list[PostgresDatastore]

    @pytest.fixture(autouse=True)
    def _database(self, recorder_db: str) -> Iterator[None]:
        self.dbname = recorder_db
        self.datastores = []
        yield
        for datastore in self.datastores:
            datastore.close()
        with psycopg.connect(f"postgresql://postgres@127.0.0.1:5432/{recorder_db}") as conn:
            conn.execute(f"DROP TABLE IF EXISTS {TABLE}_{self.id_type}")

    def create_recorder(self) -> JsonInsertApplicationRecorder:
        datastore = PostgresDatastore(
            dbname=self.dbname,
            host="127.0.0.1",
            port=5432,
            user="postgres",
            password="",
            pool_size=4,
            max_overflow=4,
            originator_id_type=self.id_type,  # type: ignore[arg-type]
        )
        self.datastores.append(datastore)
        recorder = JsonInsertApplicationRecorder(
            datastore, events_table_name=f"{TABLE}_{self.id_type}"
        )
        recorder.create_table()
        return recorder

    def new_originator_id(self) -> Any:
        return uuid.uuid4() if self.id_type == "uuid" else f"member-{uuid.uuid4()}"


class TestAsApplicationRecorder(_OnOurRecorder, ApplicationRecorderTestCase[Any]):
    pass


class TestAsApplicationRecorderWithTextIds(_OnOurRecorder, ApplicationRecorderTestCase[Any]):
    id_type = "text"


class TestNonInterleavingNotificationIds(_OnOurRecorder, NonInterleavingNotificationIDsBaseCase):
    pass


def test_the_event_store_uses_it(pg_url: str) -> None:
    app = Members(env=event_store_env(Settings(database_url=pg_url)))
    try:
        assert type(app.recorder) is JsonInsertApplicationRecorder
    finally:
        app.close()


class _OnOurSQLiteRecorder:
    """Each test gets our SQLite recorder on a file database of its own."""

    with_markers = False
    datastores: list[SQLiteDatastore]

    @pytest.fixture(autouse=True)
    def _database(self, tmp_path: Any) -> Iterator[None]:
        self.path = str(tmp_path / "recorder.db")
        self.datastores = []
        yield
        # Not closed here: a reader thread of the library's concurrency cases may still
        # be in a query (closing a SQLite connection under it crashes the interpreter);
        # each datastore closes when its last user lets go of it.
        self.datastores.clear()

    def create_recorder(self) -> GuardedSQLiteApplicationRecorder:
        datastore = SQLiteDatastore(self.path, lock_timeout=30, pool_size=12, max_overflow=12)
        self.datastores.append(datastore)
        recorder = GuardedSQLiteApplicationRecorder(datastore)
        recorder.create_table()
        if self.with_markers:
            with datastore.transaction(commit=True) as c:
                c.execute(
                    "CREATE TABLE IF NOT EXISTS forget_markers (subject_hash TEXT PRIMARY KEY, "
                    "member_id TEXT NOT NULL, state TEXT NOT NULL, seq INTEGER NOT NULL)"
                )
        return recorder

    def new_originator_id(self) -> Any:
        return uuid.uuid4()


class TestSQLiteAsApplicationRecorder(_OnOurSQLiteRecorder, ApplicationRecorderTestCase[Any]):
    pass


class TestSQLiteWithMarkers(_OnOurSQLiteRecorder, ApplicationRecorderTestCase[Any]):
    with_markers = True


class TestSQLiteNonInterleavingNotificationIds(
    _OnOurSQLiteRecorder, NonInterleavingNotificationIDsBaseCase
):
    with_markers = True


def test_the_sqlite_event_store_uses_it(tmp_path: Any) -> None:
    app = Members(
        env=event_store_env(
            Settings(database_url=f"sqlite:///{tmp_path / 'x.db'}"), create_table=True
        )
    )
    try:
        assert type(app.recorder) is GuardedSQLiteApplicationRecorder
    finally:
        app.close()


def test_a_save_that_outwaits_a_lock_timeout_leaves_its_connection_fit(pg_url: str) -> None:
    """psycopg prepares a statement on its sixth run on a connection. A save runs in a
    pipeline; when its table lock times out, what was queued behind the lock is skipped by
    the server, including a statement on its sixth run, never prepared there. The library
    ended such a transaction with a COMMIT (the server's rollback, not psycopg's), so
    psycopg kept the statement's name, and every later save on that connection failed
    with 'prepared statement "_pg3_N" does not exist': a spend failed so in CI. Here, on
    the pool's one connection: six saves, then one that waits out a lock held elsewhere
    (the check queued behind the lock on its sixth run; the library retries after a lock
    timeout), then more saves: all are stored."""
    env = {
        **event_store_env(Settings(database_url=pg_url)),
        "POSTGRES_POOL_SIZE": "1",
        "POSTGRES_LOCK_TIMEOUT": "1",
    }
    app = Members(env=env)
    blocker = psycopg.connect(pg_url.replace("+psycopg", ""))
    try:
        recorder = app.recorder
        stream = uuid.uuid4()
        for version in range(1, 7):  # five runs of the check of a save's predecessor
            recorder.insert_events([StoredEvent(stream, version, "t", b"{}")])
        blocker.execute(f"LOCK TABLE {recorder.events_table_name} IN ACCESS EXCLUSIVE MODE")
        release = threading.Timer(1.6, blocker.rollback)  # after the first lock timeout (1 s)
        release.start()
        started = time.monotonic()
        recorder.insert_events([StoredEvent(stream, 7, "t", b"{}")])
        assert time.monotonic() - started > 1  # it did wait out a timeout
        release.join()
        for version in range(8, 11):
            recorder.insert_events([StoredEvent(stream, version, "t", b"{}")])
        assert [e.originator_version for e in recorder.select_events(stream)] == list(range(1, 11))
    finally:
        blocker.close()
        app.close()


def test_saves_refused_in_the_database_leave_their_connection_fit(pg_url: str) -> None:
    """A save's statements go in one pipeline sync and the erasure checks' rows are read
    after it; a refusal then raises through the transaction, which psycopg rolls back
    (and so forgets the statements it prepared in the pipeline: one on its sixth run
    there was skipped by the server if a statement before it failed). On the pool's one
    connection: five saves, then two refused by the erasure guard (a marker erasing the
    stream, the insert on its sixth run) and one whose predecessor is gone, then more
    saves: each refused one stores nothing and raises the erasure, and every later save
    is stored."""
    from loyalty.adapters.db import Database
    from loyalty.adapters.erasure_store import SqlErasureStore
    from loyalty.adapters.event_store import erase_stream
    from loyalty.adapters.migrate import migrate
    from loyalty.application.accounts import StreamErased
    from loyalty.application.erasure import ERASING, Marker

    settings = Settings(database_url=pg_url)
    db = Database(settings)
    migrate(db)
    app = Members(env={**event_store_env(settings), "POSTGRES_POOL_SIZE": "1"})
    try:
        recorder = app.recorder
        kept, erased = uuid.uuid4(), uuid.uuid4()
        recorder.insert_events([StoredEvent(erased, 1, "t", b"{}")])
        for version in range(1, 5):
            recorder.insert_events([StoredEvent(kept, version, "t", b"{}")])
        store = SqlErasureStore(db)
        now = datetime.now(UTC)
        store.put_marker(Marker("h", str(erased), now, ERASING), now + timedelta(days=1))
        for _ in range(2):
            with pytest.raises(StreamErased) as refused:
                recorder.insert_events([StoredEvent(erased, 2, "t", b"{}")])
            assert refused.value.reason == "erasing"
        erase_stream(db, str(kept))
        with pytest.raises(StreamErased) as gone:
            recorder.insert_events([StoredEvent(kept, 5, "t", b"{}")])
        assert gone.value.reason == "gone"
        other = uuid.uuid4()
        for version in range(1, 9):
            recorder.insert_events([StoredEvent(other, version, "t", b"{}")])
        assert [e.originator_version for e in recorder.select_events(other)] == list(range(1, 9))
        assert [e.originator_version for e in recorder.select_events(erased)] == [1]
        assert recorder.select_events(kept) == []
    finally:
        app.close()
        db.dispose()
