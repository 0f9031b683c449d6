"""The eventsourcing library's own recorder test cases, run against our subclass of its
PostgreSQL application recorder (``loyalty.adapters.event_recorder``): inserts, selects,
notification ids in order and without interleaving, concurrency, both id types. And our
event store is wired to it."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from eventsourcing.postgres import PostgresDatastore
from eventsourcing.tests.persistence import (
    ApplicationRecorderTestCase,
    NonInterleavingNotificationIDsBaseCase,
)

from loyalty.adapters.event_recorder import JsonInsertApplicationRecorder
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
