"""The eventsourcing library's PostgreSQL application recorder, inserting a batch of
stored events from one JSON parameter instead of an array of composite values.

psycopg dumps a list parameter element by element in Python; the library's insert of an
award group (an array of ``stored_event`` composites) spent most of its client time
there. Here the rows go as one JSON text (built by orjson, in C) that PostgreSQL unpacks
in order (``WITH ORDINALITY``), so notification ids follow the events' order exactly as
the library's own statement does. Everything else (the table lock, NOTIFY, returned
notification ids, selects) is the library's; the library's own recorder test cases run
against this class (tests/integration/test_event_recorder.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson
from eventsourcing.persistence import StoredEvent
from eventsourcing.postgres import PostgresApplicationRecorder
from psycopg import Cursor
from psycopg.rows import DictRow
from psycopg.sql import SQL, Identifier

TOPIC = f"{__name__}:JsonInsertApplicationRecorder"


class JsonInsertApplicationRecorder(PostgresApplicationRecorder):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.insert_events_statement = SQL(
            "INSERT INTO {schema}.{table} AS t "
            "(originator_id, originator_version, topic, state) "
            "SELECT (e->>0)::{id_type}, (e->>1)::bigint, e->>2, decode(e->>3, 'hex') "
            "FROM jsonb_array_elements(%s::text::jsonb) WITH ORDINALITY AS x(e, n) "
            "ORDER BY n RETURNING notification_id"
        ).format(
            schema=Identifier(self.datastore.schema),
            table=Identifier(self.events_table_name),
            id_type=Identifier(self.datastore.originator_id_type),
        )

    def _insert_stored_events(
        self,
        curs: Cursor[DictRow],
        stored_events: Sequence[StoredEvent],
        **_: Any,
    ) -> None:
        self._lock_table(curs)
        self._notify_channel(curs)
        rows = orjson.dumps(
            [
                (str(e.originator_id), e.originator_version, e.topic, e.state.hex())
                for e in stored_events
            ]
        ).decode()
        curs.execute(query=self.insert_events_statement, params=(rows,))
