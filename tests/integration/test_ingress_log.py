"""The ingress log on real SQLite files and a real PostgreSQL database."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import psycopg
import sqlalchemy as sa

from loyalty.adapters.db import Database
from loyalty.adapters.ingress_log import (
    KEYS_DAYS,
    KEYS_EPOCH,
    KEYS_LOCK_NS,
    START,
    PostgresIngressLog,
    create_ingress_log,
    create_keys_partition,
    key_generation,
)
from loyalty.application.ingress import IngressRecord, shard_of
from tests.conftest import backends, migrate_to

NOW = datetime.now(UTC).replace(microsecond=0)


def rec(
    event_id: str,
    *,
    source: str = "src",
    user: str = "u1",
    at: datetime | None = None,
    shard: int | None = None,
) -> IngressRecord:
    return IngressRecord(
        shard=shard_of(user, 16) if shard is None else shard,
        source=source,
        event_id=event_id,
        user_id=user,
        type="played_game",
        occurred_at=at or NOW,
        attributes_json='{"result": "win", "note": "tab\\there, back\\\\slash"}',
    )


def count_rows(db: Database) -> int:
    with db.read() as conn:
        return int(conn.execute(sa.text("SELECT count(*) FROM ingress_events")).scalar_one())


def read_settled(log: object, shard: int, after: tuple[int, int], limit: int, expect: int) -> list:  # type: ignore[type-arg]
    """read_after, retried while another session's transaction holds rows back (on a
    shared server that may be any database's writer; the rows are never skipped)."""
    deadline = time.monotonic() + 30
    while True:
        rows = log.read_after(shard, after, limit)  # type: ignore[attr-defined]
        if len(rows) >= expect or time.monotonic() > deadline:
            return rows  # type: ignore[no-any-return]
        time.sleep(0.02)


def read_all(log: object, shard: int) -> list[tuple[str, str]]:
    rows, after = [], START
    while True:
        batch = log.read_after(shard, after, 1000)  # type: ignore[attr-defined]
        if not batch:
            return rows
        rows += [(r.source, r.event_id) for r in batch]
        after = batch[-1].position


def test_append_dedups_per_source_and_round_trips(db: Database) -> None:
    log = create_ingress_log(db)
    batch = [rec("e1"), rec("e2", at=NOW - timedelta(days=2))]
    assert log.append(batch) == 2
    assert log.append(batch) == 0  # a resend stores nothing
    assert log.append([rec("e1", source="other"), rec("e3")]) == 2  # dedup is per source
    assert count_rows(db) == 4
    shard = shard_of("u1", 16)
    got = read_settled(log, shard, START, 10, expect=4)
    assert sorted((r.source, r.event_id) for r in got) == [
        ("other", "e1"),
        ("src", "e1"),
        ("src", "e2"),
        ("src", "e3"),
    ]
    first = next(r for r in got if r.event_id == "e2")
    assert first.occurred_at == NOW - timedelta(days=2)
    assert first.attributes == {"result": "win", "note": "tab\there, back\\slash"}
    assert first.user_id == "u1" and first.event_type == "played_game"
    assert log.read_after(shard, got[-1].position, 10) == []


def test_partly_duplicate_batch_stores_only_new_rows(db: Database) -> None:
    log = create_ingress_log(db)
    log.append([rec("e1"), rec("e2")])
    assert log.append([rec("e0"), rec("e1"), rec("e2"), rec("e3")]) == 2
    assert count_rows(db) == 4


def test_concurrent_writers_and_a_tailing_reader_see_every_row_once(db: Database) -> None:
    """8 writers append while a reader follows its checkpoint: nothing skipped or repeated."""
    log = create_ingress_log(db)
    writers, batches, per_batch = 8, 12, 50
    done = threading.Event()
    seen: list[tuple[str, str]] = []

    def write(w: int) -> None:
        for b in range(batches):
            log.append([rec(f"{w}-{b}-{i}", shard=0) for i in range(per_batch)])

    expected = writers * batches * per_batch

    def tail() -> None:
        # Another session's open transaction can hold rows back for a while (never skip
        # them): after the writers finish, keep reading until all came or 30 s passed.
        after, deadline = START, None
        while True:
            batch = log.read_after(0, after, 500)
            seen.extend((r.source, r.event_id) for r in batch)
            if batch:
                after = batch[-1].position
            elif done.is_set():
                deadline = deadline or time.monotonic() + 30
                if len(seen) >= expected or time.monotonic() > deadline:
                    return
                time.sleep(0.01)

    reader = threading.Thread(target=tail)
    reader.start()
    threads = [threading.Thread(target=write, args=(w,)) for w in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done.set()
    reader.join()
    assert len(seen) == expected
    assert len(set(seen)) == len(seen)


@backends("postgresql")
def test_reader_never_skips_a_row_that_commits_late(settings, db: Database) -> None:  # type: ignore[no-untyped-def]
    """An older transaction that commits after a newer one is still read, in order."""
    log = create_ingress_log(db)
    slow = psycopg.connect(settings.database_url)
    try:
        slow.execute(  # takes its seq and txid first, commits last
            "INSERT INTO ingress_events (shard, source, event_id, user_id, type, occurred_at, "
            "attributes) VALUES (0, 'src', 'slow', 'u', 't', %s, '{}')",
            (NOW,),
        )
        assert log.append([rec("fast", shard=0)]) == 1  # commits first
        # A naive reader (seq order, everything committed) would see only "fast" now,
        # move its checkpoint past "slow"'s seq, and never see "slow".
        with db.read() as conn:
            naive = conn.execute(
                sa.text("SELECT event_id, seq FROM ingress_events WHERE shard = 0 ORDER BY seq")
            ).all()
        assert [r[0] for r in naive] == ["fast"]
        assert naive[0][1] > 1
        assert log.read_after(0, START, 10) == []  # ours waits for the older transaction
        slow.commit()
    finally:
        slow.close()
    assert [r.event_id for r in read_settled(log, 0, START, 10, expect=2)] == ["slow", "fast"]


@backends("postgresql")
def test_a_partition_is_created_for_a_new_day(settings, db: Database) -> None:  # type: ignore[no-untyped-def]
    log = PostgresIngressLog(db)
    day = datetime(2031, 3, 4, 23, 59, 59, tzinfo=UTC)
    assert day.date() not in log.partitions()
    # Two processes' logs racing to create the same day both succeed.
    other = PostgresIngressLog(Database(settings))
    with ThreadPoolExecutor(2) as pool:
        appends = [
            pool.submit(lg.append, [rec(f"x{i}", at=day)]) for i, lg in enumerate([log, other])
        ]
        assert [f.result() for f in appends] == [1, 1]  # both stored their row, neither raised
    assert day.date() in log.partitions()
    with db.read() as conn:
        bounds = conn.execute(
            sa.text(
                "SELECT pg_get_expr(relpartbound, oid) FROM pg_class "
                "WHERE relname = 'ingress_events_p20310304'"
            )
        ).scalar_one()
        keys = conn.execute(
            # keys go by the day they are received (the database's clock)
            sa.text(
                "SELECT count(*) FROM ingress_keys WHERE event_id IN ('x0', 'x1') "
                "AND day = (now() AT TIME ZONE 'UTC')::date"
            )
        ).scalar_one()
        default = conn.execute(
            sa.text(
                "SELECT count(*) FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                "WHERE i.inhparent = 'ingress_events'::regclass "
                "AND pg_get_expr(c.relpartbound, c.oid) = 'DEFAULT'"
            )
        ).scalar_one()
    assert "2031-03-04 00:00:00+00" in bounds and "2031-03-05 00:00:00+00" in bounds
    assert keys == 2  # each stored row's dedup key, recorded by the same statement
    assert default == 0
    assert count_rows(db) == 2
    other._db.dispose()


def test_a_resend_after_midnight_is_stored_once_and_awarded_once(db: Database) -> None:
    """A client stamps the time when it sends: the first try at 23:59:58, the retry at
    00:00:01 the next day. Same source and event id: stored once (PostgreSQL: across day
    partitions), counted as a duplicate, awarded once; another source's same id is not."""
    from loyalty.application.ingress import IncomingEvent, IngestService
    from tests.conftest import drain_pipeline

    midnight = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    service = IngestService(
        create_ingress_log(db),
        clock=lambda: midnight + timedelta(seconds=2),
        retention=timedelta(days=7),
        future_skew=timedelta(minutes=5),
        shard_count=16,
    )

    def send(source: str, at: datetime) -> tuple[int, int]:
        event = IncomingEvent("order-77", "night-owl", "joined_competition", at, "{}")
        result = service.ingest(source, [event])
        return result.accepted, result.duplicates

    assert send("shop", midnight - timedelta(seconds=2)) == (1, 0)
    assert send("shop", midnight + timedelta(seconds=1)) == (0, 1)
    # a batch holding the resend and a new event: the new one is stored, the resend not
    batch = [
        IncomingEvent("order-77", "night-owl", "joined_competition", midnight, "{}"),
        IncomingEvent("order-78", "night-owl", "logged_on", midnight, "{}"),
    ]
    assert (service.ingest("shop", batch).accepted, count_rows(db)) == (1, 2)
    assert send("app", midnight + timedelta(seconds=1)) == (1, 0)  # another source
    assert count_rows(db) == 3
    drain_pipeline(db)
    from loyalty.adapters.event_store import event_store_env
    from loyalty.application.accounts import Accounts, Members

    members = Members(env=event_store_env(db.settings))
    try:
        member = Accounts(members).get("night-owl")
        # joined_competition twice (shop, app) and one logon: 2 * (20, 50) + (1, 1)
        assert (member.currency, member.rank_points) == (41, 101)
    finally:
        members.close()


def test_store_tells_a_conflicting_resend_from_a_repeat(db: Database) -> None:
    """Issue 32 item 1: the content stored with the key (the row on SQLite, the key's
    fingerprint on PostgreSQL) tells a repeat from a conflict, across days too."""
    log = create_ingress_log(db)
    assert log.store([rec("e1"), rec("e2")]).inserted == 2
    moved = rec("e2", at=NOW - timedelta(days=1))  # a resend stamped on another day
    stored = log.store([rec("e1"), rec("e3"), rec("e2", user="u2"), moved])
    assert stored.inserted == 1
    assert stored.not_stored == {0: False, 2: True, 3: True}


@backends("postgresql")
def test_a_key_stored_before_fingerprints_is_not_called_a_conflict(db: Database) -> None:
    """Keys recorded before migration 0018 have no fingerprint: a resend of one counts
    as a repeat (its content is not known), and it is still not stored twice."""
    log = create_ingress_log(db)
    assert log.store([rec("old")]).inserted == 1
    with db.write() as conn:
        conn.execute(sa.text("UPDATE ingress_keys SET fingerprint = NULL"))
    stored = log.store([rec("old", user="u9"), rec("new")])
    assert (stored.inserted, stored.not_stored) == (1, {0: False})
    assert count_rows(db) == 2


def _older_key(db: Database, event_id: str, *, hold: bool = False) -> psycopg.Connection:
    """A key stored by a batch received in the previous generation of keys (its table
    created as ingest would). With ``hold``, the batch is still in flight: its
    transaction holds that generation's lock shared, as every batch does, and has not
    committed; the caller commits it."""
    today = datetime.now(UTC).date()
    previous = key_generation(today) - timedelta(days=KEYS_DAYS)
    create_keys_partition(db, previous)
    conn = psycopg.connect(db.settings.database_url.replace("+psycopg", ""))
    if hold:
        conn.execute(
            "SELECT pg_advisory_xact_lock_shared(%s, %s)",
            (KEYS_LOCK_NS, (previous - KEYS_EPOCH).days),
        )
    conn.execute(
        "INSERT INTO ingress_keys (source, event_id, day, fingerprint) VALUES (%s, %s, %s, 0)",
        ("src", event_id, previous + timedelta(days=KEYS_DAYS - 1)),
    )
    if not hold:
        conn.commit()
        conn.close()
    return conn


@backends("postgresql")
def test_a_key_received_in_an_older_generation_is_a_duplicate(db: Database) -> None:
    """Keys are stored by the day they are received, in generations of eight days (a
    table each, dropped whole by retention): a resend of a key the previous generation
    holds is a duplicate, alone (the common path, one COPY) and beside new events (the
    fallback, which stores the new ones only)."""
    _older_key(db, "e-old")
    log = create_ingress_log(db)
    assert log.store([rec("e-old")]).inserted == 0
    stored = log.store([rec("e-new"), rec("e-old")])
    assert (stored.inserted, set(stored.not_stored)) == (1, {1})
    assert count_rows(db) == 1
    assert log.store([rec("e-old", source="other")]).inserted == 1  # another source's id


@backends("postgresql")
def test_the_first_batch_of_a_generation_waits_for_the_previous_ones_in_flight(
    db: Database,
) -> None:
    """A batch of the previous generation still in flight is not visible to the check of
    the older generations: each session's first batch of a generation waits for them
    (the previous generation's lock, exclusively once), then sees the key. Without the
    wait, the resend here was stored while the first was still in flight."""
    first = _older_key(db, "e-flight", hold=True)
    fresh = Database(db.settings)  # new sessions: none has entered this generation
    stored: list[int] = []
    thread = threading.Thread(
        target=lambda: stored.append(PostgresIngressLog(fresh).store([rec("e-flight")]).inserted)
    )
    try:
        thread.start()
        thread.join(timeout=1.0)
        assert thread.is_alive() and not stored  # waiting for the batch in flight
        first.commit()
        thread.join(timeout=30)
        assert stored == [0] and count_rows(db) == 0
    finally:
        first.close()
        thread.join(timeout=30)
        fresh.dispose()


@backends("postgresql")
def test_keys_stored_before_the_generations_still_catch_resends(db: Database) -> None:
    """Migration 0022 moves the keys of one table into generations (by the day their
    event occurred, at most today): a resend of an event stored before it is still a
    duplicate, and down and up again keeps them."""
    from loyalty.adapters.ingress_log import create_day_partition

    migrate_to(db, "0021_contract2", down=True)
    days = [NOW - timedelta(days=3), NOW]
    for at in days:
        create_day_partition(db, at.date(), caps=False)
    with db.write() as conn:  # the keys go in by the trigger of before
        for i, at in enumerate(days):
            conn.execute(
                sa.text(
                    "INSERT INTO ingress_events (shard, source, event_id, user_id, type, "
                    "occurred_at, attributes) VALUES (0, 'src', :e, 'u1', 't', :at, '{}')"
                ),
                {"e": f"before-{i}", "at": at},
            )
    migrate_to(db, "head", down=False)
    with db.read() as conn:
        moved = dict(
            conn.execute(sa.text("SELECT event_id, day FROM ingress_keys ORDER BY 1")).all()
        )
    assert moved == {"before-0": days[0].date(), "before-1": days[1].date()}
    log = PostgresIngressLog(db)
    stored = log.store([rec("before-0", at=days[0]), rec("before-1"), rec("after")])
    assert (stored.inserted, set(stored.not_stored)) == (1, {0, 1})
    migrate_to(db, "0021_contract2", down=True)
    migrate_to(db, "head", down=False)
    assert log.store([rec("after"), rec("before-0", at=days[0])]).inserted == 0
    assert count_rows(db) == 3


@backends("postgresql")
def test_the_generations_are_the_same_in_python_and_in_sql(db: Database) -> None:
    """Ingest creates a generation's table from Python's ``key_generation``; the trigger
    routes keys by the SQL function: they must agree on every day."""
    first = datetime(2026, 12, 1, tzinfo=UTC).date()
    days = [first + timedelta(days=i) for i in range(40)]
    with db.read() as conn:
        got = conn.execute(
            sa.text("SELECT d::date, ingress_keys_generation(d::date) FROM unnest(:days) d"),
            {"days": days},
        ).all()
    assert dict(got) == {d: key_generation(d) for d in days}
    starts = sorted({key_generation(d) for d in days})  # eight days each
    assert starts == [starts[0] + timedelta(days=8 * i) for i in range(6)]
