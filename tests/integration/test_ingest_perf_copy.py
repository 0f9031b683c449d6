"""The hand-built COPY buffer of the PostgreSQL ingress log stores exactly what
psycopg's own row formatting stores, and hands the rows it cannot prove safe to
psycopg."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
import sqlalchemy as sa

from loyalty.adapters import ingress_log
from loyalty.adapters.db import Database
from loyalty.adapters.ingress_log import PostgresIngressLog, copy_text
from loyalty.application.ingress import IngressRecord

NOW = datetime.now(UTC).replace(microsecond=123456)

TRICKY = [
    ("plain", "u1", '{"a": 1}'),
    ("back\\slash", "u\\\\2", '{"path": "C:\\\\dir\\\\file", "tab": "a\\tb", "nl": "a\\nb"}'),
    ("ends-with-\\", "\\N", '{"null-ish": "\\\\N", "dot": "\\\\."}'),
    ("unicode-\u00e9\u6f22\U0001f600", "\u00fcser", '{"emoji": "\U0001f600", "\u00e9": "\u2028"}'),
    ("ctl-\x08\x0b\x0c", "u3", '{"bell": "\\u0007"}'),
]


def rec(event_id: str, user_id: str, attributes: str, at: datetime = NOW) -> IngressRecord:
    return IngressRecord(3, "src", event_id, user_id, "played_game", at, attributes)


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


@pytest.fixture
def pg_db(settings, db: Database) -> Database:  # type: ignore[no-untyped-def]
    if settings.backend != "postgresql":
        pytest.skip("COPY is PostgreSQL's")
    return db


def test_buffer_rows_equal_psycopg_rows(pg_db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    records = [rec(*t) for t in TRICKY]
    assert copy_text(records) is not None  # all of these take the fast way
    log = PostgresIngressLog(pg_db)
    assert log.append(records) == len(records)
    fast = stored(pg_db)
    with pg_db.write() as conn:
        conn.execute(sa.text("TRUNCATE ingress_events"))
    # The same rows through psycopg's write_row (what the buffer replaced).
    monkeypatch.setattr(ingress_log, "copy_text", lambda _records: None)
    assert log.append(records) == len(records)
    assert stored(pg_db) == fast
    assert [r[2] for r in fast] == sorted(t[0] for t in TRICKY)
    assert fast[0][5] == NOW


@pytest.mark.parametrize(
    "bad",
    [
        rec("tab\tin-id", "u", "{}"),
        rec("e", "new\nline", "{}"),
        rec("e", "carriage\rreturn", "{}"),
        rec("e", "u", '{"a":\t1}'),
        rec("e", "nul\x00", "{}"),
        rec("e", "surrogate\ud800", "{}"),
    ],
)
def test_fields_that_need_escaping_go_through_psycopg(bad: IngressRecord) -> None:
    assert copy_text([rec("ok", "u", "{}"), bad]) is None


def test_round_trip_of_rows_psycopg_formats(pg_db: Database) -> None:
    records = [rec("tab\tin-id", "new\nline", '{"a":\t1}'), rec("cr", "a\rb", "{}")]
    assert PostgresIngressLog(pg_db).append(records) == 2
    rows = stored(pg_db)
    assert [(r[2], r[3]) for r in rows] == [("cr", "a\rb"), ("tab\tin-id", "new\nline")]


def test_offsets_and_naive_times_store_the_same_instant(pg_db: Database) -> None:
    plus_two = timezone(timedelta(hours=2))
    records = [
        rec("a", "u", "{}", at=NOW.astimezone(plus_two)),
        rec("b", "u", "{}", at=NOW.replace(microsecond=0)),
    ]
    assert PostgresIngressLog(pg_db).append(records) == 2
    rows = stored(pg_db)
    assert rows[0][5] == NOW and rows[1][5] == NOW.replace(microsecond=0)


def test_a_resent_batch_is_all_duplicates_and_a_mixed_one_stores_the_new(
    pg_db: Database,
) -> None:
    log = PostgresIngressLog(pg_db)
    first = [rec(f"e{i}", "u", '{"i": "\\\\"}') for i in range(5)]
    assert log.append(first) == 5
    assert log.append(first) == 0  # the single-statement COPY fails whole: nothing stored
    assert log.append([*first[:2], rec("e9", "u", "{}")]) == 1
    assert len(stored(pg_db)) == 6
