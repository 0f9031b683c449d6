"""The PostgreSQL ingress log's binary COPY (one autocommit statement) stores exactly
what the text-format COPY of psycopg's ``write_row`` stored before it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import psycopg
import pytest
import sqlalchemy as sa

from loyalty.adapters.db import Database
from loyalty.adapters.ingress_log import PostgresIngressLog
from loyalty.application.ingress import IngressRecord
from loyalty.config import Settings
from tests.conftest import backends

pytestmark = backends("postgresql")

NOW = datetime.now(UTC).replace(microsecond=123456)
COLUMNS = "(shard, source, event_id, user_id, type, occurred_at, attributes)"

TRICKY = [
    ("plain", "u1", '{"a": 1}'),
    ("back\\slash", "u\\\\2", '{"path": "C:\\\\dir\\\\file", "tab": "a\\tb", "nl": "a\\nb"}'),
    ("ends-with-\\", "\\N", '{"null-ish": "\\\\N", "dot": "\\\\."}'),
    ("unicode-\u00e9\u6f22\U0001f600", "\u00fcser", '{"emoji": "\U0001f600", "\u00e9": "\u2028"}'),
    ("ctl-\x08\x0b\x0c", "u3", '{"bell": "\\u0007", "n": [1, 2.50, -0, 1e3, null, true]}'),
    ("tab\tin-id", "new\nline", '{"a":\t1,\r\n "b": {"c": []}}'),
    ("cr", "a\rb", "{}"),
]


def rec(event_id: str, user_id: str, attributes: str, at: datetime | None = None) -> IngressRecord:
    return IngressRecord(3, "src", event_id, user_id, "played_game", at or NOW, attributes)


def stored(db: Database) -> list[tuple[object, ...]]:
    with db.read() as conn:
        return [
            tuple(r)
            for r in conn.execute(
                sa.text(
                    "SELECT shard, source, event_id, user_id, type, occurred_at, "
                    "attributes::text FROM ingress_events ORDER BY event_id"
                )
            )
        ]


def text_copy(settings: Settings, records: list[IngressRecord]) -> None:
    """The reference: the text-format COPY this adapter used before."""
    with psycopg.connect(settings.database_url) as conn, conn.cursor() as cur:
        with cur.copy(f"COPY ingress_events {COLUMNS} FROM STDIN") as copy:
            for r in records:
                copy.write_row(
                    (
                        r.shard,
                        r.source,
                        r.event_id,
                        r.user_id,
                        r.type,
                        r.occurred_at,
                        r.attributes_json,
                    )
                )


@pytest.fixture
def pg_db(settings: Settings, db: Database) -> Database:
    return db


def truncate(db: Database) -> None:
    with db.write() as conn:
        conn.execute(sa.text("TRUNCATE ingress_events, ingress_keys"))  # rows and dedup keys


def test_binary_copy_stores_what_text_copy_stored(settings: Settings, pg_db: Database) -> None:
    records = [rec(*t) for t in TRICKY]
    log = PostgresIngressLog(pg_db)
    assert log.append(records) == len(records)
    ours = stored(pg_db)
    truncate(pg_db)
    text_copy(settings, records)
    assert ours == stored(pg_db)
    assert len(ours) == len(TRICKY) and {r[5] for r in ours} == {NOW}


def test_offsets_and_naive_times_store_what_text_copy_stored(
    settings: Settings, pg_db: Database
) -> None:
    plus_two = timezone(timedelta(hours=2))
    aware = [rec("a", "u", "{}", at=NOW.astimezone(plus_two)), rec("b", "u", "{}")]
    naive = [rec("c", "u", "{}", at=NOW.replace(tzinfo=None)), rec("d", "u", "{}")]
    log = PostgresIngressLog(pg_db)
    assert log.append(aware) == 2
    assert log.append(naive) == 2  # a naive time goes the text way (session time zone)
    ours = stored(pg_db)
    truncate(pg_db)
    text_copy(settings, aware + naive)
    assert ours == stored(pg_db)
    assert {r[5] for r in ours} == {NOW}


def test_resent_and_mixed_batches_after_a_failed_copy(pg_db: Database) -> None:
    log = PostgresIngressLog(pg_db)
    first = [rec(f"e{i}", "u", '{"i": "\\\\"}') for i in range(5)]
    assert log.append(first) == 5
    assert log.append(first) == 0  # the single-statement COPY fails whole: nothing stored
    assert log.append([*first[:2], rec("e9", "u", "{}")]) == 1
    assert len(stored(pg_db)) == 6
    with pg_db.write() as conn:  # the pooled connection is back to transactions
        raw = conn.connection.driver_connection
        assert raw is not None and raw.autocommit is False


def test_a_nul_is_refused_and_stores_nothing(pg_db: Database) -> None:
    with pytest.raises(psycopg.DataError):
        PostgresIngressLog(pg_db).append([rec("ok", "u", "{}"), rec("bad", "nul\x00", "{}")])
    assert stored(pg_db) == []
