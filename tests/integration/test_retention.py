"""Retention on real SQLite and PostgreSQL, with an injected clock: expired days are gone
(PostgreSQL: partitions dropped, not merely detached), bytes come back, and unprocessed
events, accounts and days inside the window stay."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, date, datetime, timedelta
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa

from loyalty.adapters.db import Database
from loyalty.adapters.event_store import event_store_env
from loyalty.adapters.ingress_log import (
    caps_partition_name,
    create_day_partition,
    create_ingress_log,
    key_generation,
    partition_name,
)
from loyalty.adapters.lease_keys import RETENTION_LEASE
from loyalty.adapters.pipeline_store import ShardLeases
from loyalty.adapters.retention_store import (
    PostgresRetentionStore,
    SqliteRetentionStore,
    create_retention_store,
)
from loyalty.adapters.tables import forget_markers
from loyalty.application.accounts import Accounts, Members
from loyalty.application.ingress import IncomingEvent, IngestService, shard_of
from loyalty.application.retention import KeptDay, Retention, RetentionReport
from loyalty.bootstrap import build_pipeline, build_projection, build_retention
from loyalty.config import Settings
from loyalty.observability import Metrics
from loyalty.worker import build_retention_job
from tests.conftest import backends, migrate_to, wait_visible
from tests.e2e.live import wait_for

# The ingest clock: events of D1..D4 are inside its 7-day window, so they are accepted.
NOW = datetime(2030, 3, 4, 12, tzinfo=UTC)
D1, D2, D3, D4 = (date(2030, 3, day) for day in (1, 2, 3, 4))
# Retention as of a week later: D1-D3 lie wholly before AS_OF - 7 days; D4 does not.
AS_OF = datetime(2030, 3, 11, 6, tzinfo=UTC)
PER_DAY = 1500
PAD = '{"result": "win", "pad": "' + "x" * 200 + '"}'


@pytest.fixture(autouse=True)
def no_2030_partitions(db: Database) -> None:
    """PostgreSQL: the session's database is shared; start without this module's days."""
    if db.backend != "postgresql":
        return
    with db.write() as conn:
        names = conn.execute(
            sa.text("SELECT relname FROM pg_class WHERE relkind = 'r' AND relname ~ :p"),
            {"p": "^(ingress_events_p|pipeline_caps_)2030[0-9]{4}$"},
        ).scalars()
        for name in list(names):
            conn.execute(sa.text(f'DROP TABLE "{name}"'))


@pytest.fixture
def members(settings: Settings) -> Iterator[Members]:
    app = Members(env=event_store_env(settings))
    yield app
    app.close()


def ingest(db: Database, events: list[IncomingEvent], at: datetime = NOW) -> None:
    service = IngestService(
        create_ingress_log(db),
        clock=lambda: at,
        retention=timedelta(days=db.settings.retention_days),
        future_skew=timedelta(minutes=5),
        shard_count=db.settings.shard_count,
    )
    for i in range(0, len(events), 1000):
        result = service.ingest("src", events[i : i + 1000])
        assert not result.rejected
    wait_visible(db)


def day_events(day: date, n: int = PER_DAY, prefix: str = "") -> list[IncomingEvent]:
    at = datetime(day.year, day.month, day.day, 10, tzinfo=UTC)
    return [
        IncomingEvent(
            f"{prefix}{day}-{i}",
            f"user-{i % 200}",
            "logged_on" if i % 3 == 0 else "played_game",
            at + timedelta(seconds=i),
            PAD,
        )
        for i in range(n)
    ]


def scalar(db: Database, text: str, params: dict[str, Any] | None = None) -> Any:
    with db.read() as conn:
        return conn.execute(sa.text(text), params or {}).scalar()


def rows_per_day(db: Database) -> dict[date, int]:
    day = (
        "(occurred_at AT TIME ZONE 'UTC')::date"
        if db.backend == "postgresql"
        else "substr(occurred_at, 1, 10)"
    )
    with db.read() as conn:
        rows = conn.execute(
            sa.text(f"SELECT {day}, count(*) FROM ingress_events GROUP BY 1 ORDER BY 1")
        ).all()
    return {d if isinstance(d, date) else date.fromisoformat(d): int(n) for d, n in rows}


def caps_per_day(db: Database) -> dict[date, int]:
    with db.read() as conn:
        rows = conn.execute(sa.text("SELECT day, count(*) FROM pipeline_caps GROUP BY 1")).all()
    return {d if isinstance(d, date) else date.fromisoformat(d): int(n) for d, n in rows}


def key_count(db: Database) -> int:
    """PostgreSQL: the dedup keys (migrations 0006, 0022)."""
    return int(scalar(db, "SELECT count(*) FROM ingress_keys"))


def key_generations(db: Database) -> dict[str, int]:
    """PostgreSQL: the dedup keys' generation tables (attached or not), with their bytes."""
    with db.read() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT relname, pg_total_relation_size(oid) FROM pg_class "
                "WHERE relkind = 'r' AND relname LIKE 'ingress\\_keys\\_g%'"
            )
        ).all()
    return {str(name): int(size) for name, size in rows}


def relations(db: Database, prefix: str = "ingress_events_p") -> dict[str, str]:
    """PostgreSQL: every table named like a day partition of 2030 (of the ingress, or of
    ``prefix``), with whether it is attached, half-detached or a plain table."""
    with db.read() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT c.relname, CASE WHEN i.inhrelid IS NULL THEN 'table' "
                "WHEN i.inhdetachpending THEN 'pending' ELSE 'attached' END "
                "FROM pg_class c LEFT JOIN pg_inherits i ON i.inhrelid = c.oid "
                "WHERE c.relkind = 'r' AND c.relname LIKE :like"
            ),
            {"like": f"{prefix}2030%"},
        ).all()
    return {str(name): str(state) for name, state in rows if name}


def database_bytes(db: Database) -> int:
    if db.backend == "postgresql":
        return int(scalar(db, "SELECT pg_database_size(current_database())"))
    store = create_retention_store(db)
    assert isinstance(store, SqliteRetentionStore)
    return store.file_bytes()


def account_state(db: Database) -> tuple[int, list[Any]]:
    events_table = "members_events" if db.backend == "postgresql" else "stored_events"
    with db.read() as conn:
        count = conn.execute(sa.text(f"SELECT count(*) FROM {events_table}")).scalar_one()
        balances = conn.execute(
            sa.text(
                "SELECT user_id, currency, rank_points, lifetime_currency "
                "FROM member_balances ORDER BY user_id"
            )
        ).all()
    return int(count), [tuple(r) for r in balances]


def drain(db: Database, members: Members, expected: int, shards: list[int] | None = None) -> int:
    """Process until ``expected`` events are done. On PostgreSQL a transaction in flight
    anywhere on the server (other test sessions) holds the reader back for a moment."""
    pipeline = build_pipeline(db, members)
    done = 0
    deadline = time.monotonic() + 30
    while done < expected and time.monotonic() < deadline:
        done += pipeline.drain(shards if shards is not None else range(db.settings.shard_count))
        if done < expected:
            time.sleep(0.05)
    return done


def test_expires_processed_days_keeps_unprocessed_events_accounts_and_current_days(
    db: Database, members: Members
) -> None:
    for day in (D1, D2, D3, D4):
        ingest(db, day_events(day))
    assert drain(db, members, 4 * PER_DAY) == 4 * PER_DAY
    # ingested after the drain: one unprocessed event on D2
    ingest(db, [IncomingEvent("late-1", "late-user", "logged_on", NOW - timedelta(days=2), "{}")])
    build_projection(db, members).catch_up()
    accounts_before = account_state(db)
    assert accounts_before[0] > 0 and len(accounts_before[1]) == 200
    caps_before = caps_per_day(db)
    assert set(caps_before) == {D1, D2, D3, D4}
    bytes_before = database_bytes(db)
    if db.backend == "postgresql":
        partition_bytes = {
            day: int(scalar(db, "SELECT pg_total_relation_size(:n)", {"n": partition_name(day)}))
            for day in (D1, D2, D3, D4)
        }
        # each day's cap counters: a partition made with the day's (migration 0023)
        caps_bytes = {
            day: int(
                scalar(db, "SELECT pg_total_relation_size(:n)", {"n": caps_partition_name(day)})
            )
            for day in (D1, D2, D3, D4)
        }
        assert set(relations(db, "pipeline_caps_").values()) == {"attached"}
    metrics = Metrics(process=False)

    report = build_retention(db, metrics=metrics).run(AS_OF, strict=True)

    assert report.cutoff == D4
    assert report.kept == [KeptDay(D2, 1)] and not report.ok
    dropped = {d.day: d for d in report.dropped if d.day.year == 2030}
    left = rows_per_day(db)
    if db.backend == "postgresql":
        # whole partitions, or nothing: D2 stays whole, with its unprocessed event
        assert set(dropped) == {D1, D3}
        assert {d: dropped[d].bytes for d in dropped} == {d: partition_bytes[d] for d in (D1, D3)}
        assert left == {D2: PER_DAY + 1, D4: PER_DAY}
        # the dedup keys stay while a day is kept: a resend of its unprocessed event
        # is still a duplicate
        assert key_count(db) == 4 * PER_DAY + 1
        assert scalar(db, "SELECT count(*) FROM ingress_keys WHERE event_id = 'late-1'") == 1
        rels = relations(db)
        # gone from the catalog, not merely detached
        assert partition_name(D1) not in rels and partition_name(D3) not in rels
        assert rels[partition_name(D2)] == rels[partition_name(D4)] == "attached"
        # created ahead for the run's today and tomorrow
        assert rels["ingress_events_p20300311"] == rels["ingress_events_p20300312"] == "attached"
        dropped_metric = "loyalty_retention_partitions_dropped_total"
        assert (metrics.registry.get_sample_value(dropped_metric) or 0) >= 2
        # the cap counters of D1 and D3 went whole with their days, bytes reported
        caps = relations(db, "pipeline_caps_")
        assert caps_partition_name(D1) not in caps and caps_partition_name(D3) not in caps
        assert caps[caps_partition_name(D2)] == caps[caps_partition_name(D4)] == "attached"
        assert report.bytes_reclaimed >= sum(partition_bytes[d] + caps_bytes[d] for d in (D1, D3))
    else:
        # rows: every processed expired row goes, the unprocessed one stays
        assert set(dropped) == {D1, D2, D3}
        assert left == {D2: 1, D4: PER_DAY}
    assert all(dropped[d].rows == PER_DAY for d in dropped)
    assert metrics.registry.get_sample_value("loyalty_retention_kept_unprocessed_partitions") == 1
    # bytes came back: reported, and measured on the database / the file
    bytes_after = database_bytes(db)
    assert report.bytes_reclaimed > 2 * PER_DAY * 200
    assert bytes_before - bytes_after > 2 * PER_DAY * 200
    # derived rows of expired days went (D2 keeps its cap counters: it still has an
    # event to weigh); accounts, read models and D4 stayed
    assert caps_per_day(db) == {D2: caps_before[D2], D4: caps_before[D4]}
    assert report.cap_rows_deleted == caps_before[D1] + caps_before[D3]
    assert account_state(db) == accounts_before
    assert scalar(db, "SELECT count(*) FROM ingress_events WHERE event_id = 'late-1'") == 1

    # once the pipeline has processed it, the next run drops D2 as well
    assert drain(db, members, 1) == 1
    again = build_retention(db, metrics=metrics).run(AS_OF, strict=True)
    assert again.ok and again.kept == []
    assert rows_per_day(db) == {D4: PER_DAY}
    assert D2 in {d.day for d in again.dropped}
    assert set(caps_per_day(db)) == {D4} and again.cap_rows_deleted == caps_before[D2] + 1
    if db.backend == "postgresql":
        assert partition_name(D2) not in relations(db)
        caps = relations(db, "pipeline_caps_")
        assert {caps_partition_name(d) for d in (D1, D2, D3, D4)} & set(caps) == {
            caps_partition_name(D4)
        }
        # nothing kept: the keys' generations of days before the cutoff went whole (in
        # this test the database's clock, which dates the keys, is years before AS_OF)
        assert key_count(db) == 0 and key_generations(db) == {}
    assert metrics.registry.get_sample_value("loyalty_retention_kept_unprocessed_partitions") == 0
    # nothing left to do: a third run is a no-op
    third = build_retention(db).run(AS_OF, strict=True)
    assert third.ok and [d for d in third.dropped if d.rows] == []


def test_a_day_kept_for_its_backlog_keeps_its_cap_counters(db: Database, members: Members) -> None:
    """A member's first logon of D2 is processed (cap 1 reached), the second is still in
    the backlog when retention runs: D2 is kept, and so must be its cap counter, or the
    second logon would earn past the cap."""
    ingest(db, [IncomingEvent("on-1", "capped", "logged_on", NOW - timedelta(days=2), "{}")])
    assert drain(db, members, 1) == 1
    ingest(
        db, [IncomingEvent("on-2", "capped", "logged_on", NOW - timedelta(days=2, hours=-1), "{}")]
    )
    report = build_retention(db).run(AS_OF)
    assert report.kept == [KeptDay(D2, 1)]
    assert caps_per_day(db) == {D2: 1} and report.cap_rows_deleted == 0
    assert drain(db, members, 1) == 1
    member = Accounts(members).get("capped")
    assert (member.currency, member.rank_points) == (1, 1)
    # processed now: the next run drops the day and its counters together
    again = build_retention(db).run(AS_OF)
    assert again.ok and caps_per_day(db) == {} and again.cap_rows_deleted == 1


@backends("postgresql")
def test_caps_of_a_day_without_its_caps_partition_are_stored_all_the_same(
    db: Database, members: Members
) -> None:
    """A day partition made before migration 0023 (or a caps partition a crash left
    unmade): the pipeline makes the day's caps partition before it stores the day's
    counters, so the cap holds for the day's next event."""
    ingest(db, [IncomingEvent("on-1", "capped", "logged_on", NOW - timedelta(hours=2), "{}")])
    with db.write() as conn:
        conn.execute(sa.text(f'DROP TABLE "{caps_partition_name(D4)}"'))
    assert drain(db, members, 1) == 1
    assert caps_per_day(db) == {D4: 1}
    assert relations(db, "pipeline_caps_")[caps_partition_name(D4)] == "attached"
    ingest(db, [IncomingEvent("on-2", "capped", "logged_on", NOW - timedelta(hours=1), "{}")])
    assert drain(db, members, 1) == 1
    member = Accounts(members).get("capped")
    assert (member.currency, member.rank_points) == (1, 1)  # the second logon: capped


@backends("postgresql")
def test_a_caps_partition_gone_under_a_running_pipeline_is_made_again(
    db: Database, members: Members
) -> None:
    """A pipeline remembers the caps partitions it has seen. One dropped under it (only a
    retention racing a late event of an expired day could): that window's commit fails
    with nothing written, and its next attempt makes the partition again and stores the
    window's counter, rather than failing for ever."""
    pipeline = build_pipeline(db, members)
    shards = range(db.settings.shard_count)
    ingest(db, [IncomingEvent("on-1", "capped", "logged_on", NOW - timedelta(hours=2), "{}")])
    assert pipeline.drain(shards) == 1
    ingest(db, [IncomingEvent("on-2", "capped", "logged_on", NOW - timedelta(hours=1), "{}")])
    with db.write() as conn:  # (after the ingest, which would make it again)
        conn.execute(sa.text(f'DROP TABLE "{caps_partition_name(D4)}"'))
    with pytest.raises(psycopg.errors.CheckViolation):
        pipeline.drain(shards)
    assert caps_per_day(db) == {}  # nothing of the window was written
    assert pipeline.drain(shards) == 1
    assert caps_per_day(db) == {D4: 1}  # the window's own count: D4's went with the drop
    assert pipeline.drain(shards) == 0  # processed once


@backends("postgresql")
def test_the_caps_move_into_day_partitions_and_back(db: Database) -> None:
    """Migration 0023: the counters of a day that has its ingress partition move into
    that day's caps partition; those of a day without one are never read again and do
    not move. Down again: one table with its index on the day, the counters kept."""

    def caps() -> set[tuple[str, date, int]]:
        with db.read() as conn:
            rows = conn.execute(sa.text("SELECT user_id, day, count FROM pipeline_caps")).all()
        return {(u, d, n) for u, d, n in rows}

    def day_index() -> bool:
        return scalar(db, "SELECT to_regclass('pipeline_caps_day_idx')") is not None

    migrate_to(db, "0022_keys_generations", down=True)
    assert day_index() and relations(db, "pipeline_caps_") == {}
    create_day_partition(db, D3, caps=False)
    with db.write() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO pipeline_caps (user_id, event_type, day, shard, count) "
                "VALUES ('u1', 'logged_on', :d3, 0, 2), ('u2', 'logged_on', :d1, 0, 1)"
            ),
            {"d3": D3, "d1": D1},
        )
    migrate_to(db, "head", down=False)
    assert caps() == {("u1", D3, 2)}
    assert relations(db, "pipeline_caps_")[caps_partition_name(D3)] == "attached"
    assert not day_index()
    migrate_to(db, "0022_keys_generations", down=True)
    assert caps() == {("u1", D3, 2)} and day_index()
    assert relations(db, "pipeline_caps_") == {}
    migrate_to(db, "head", down=False)
    assert caps() == {("u1", D3, 2)}


def test_a_shard_without_checkpoint_keeps_its_expired_events(
    db: Database, members: Members
) -> None:
    events = day_events(D1, 400)
    ingest(db, events)
    first = [0, 1, 2, 3]  # the other shards: not yet
    wanted = sum(1 for e in events if shard_of(e.user_id, 16) in first)
    processed = drain(db, members, wanted, first)
    assert processed == wanted
    assert 0 < processed < 400
    report = build_retention(db).run(AS_OF)
    kept = {k.day: k.unprocessed_rows for k in report.kept}
    assert kept == {D1: 400 - processed}
    left = rows_per_day(db)[D1]
    assert left == (400 if db.backend == "postgresql" else 400 - processed)


def test_expired_forget_markers_go_and_live_ones_stay(db: Database) -> None:
    with db.write() as conn:
        for i, expires in enumerate((AS_OF - timedelta(hours=1), AS_OF + timedelta(hours=1))):
            conn.execute(
                forget_markers.insert().values(
                    subject_hash=f"h{i}",
                    member_id=f"m{i}",
                    requested_at=NOW,
                    state="erased",
                    expires_at=expires,
                )
            )
    report = build_retention(db).run(AS_OF)
    assert report.markers_deleted == 1
    assert scalar(db, "SELECT subject_hash FROM forget_markers") == "h1"


@backends("sqlite")
def test_works_without_a_forget_markers_table(settings: Settings, db: Database) -> None:
    with db.write() as conn:
        conn.execute(sa.text("DROP TABLE forget_markers"))
    assert build_retention(db).run(AS_OF).markers_deleted == 0


def test_one_process_at_a_time(settings: Settings, db: Database) -> None:
    other_process = Database(settings)
    holder = ShardLeases(other_process)
    assert holder.try_acquire(RETENTION_LEASE)
    try:
        report = build_retention(db).run(AS_OF, strict=True)
        assert report.skipped and not report.ok
    finally:
        holder.release_all()
        other_process.dispose()  # its session (and session lock) ends
    assert not build_retention(db).run(AS_OF).skipped
    assert not build_retention(db).run(AS_OF).skipped  # the lease was given back


def test_periodic_job_runs_in_the_worker(settings: Settings, db: Database) -> None:
    ingest(db, day_events(D1, 10))
    members = Members(env=event_store_env(settings))
    assert drain(db, members, 10) == 10
    members.close()
    fast = Database(settings.model_copy(update={"retention_interval_seconds": 0.05}))
    try:
        job = build_retention_job(fast, clock=lambda: AS_OF, first_delay_seconds=0)
        assert job is not None
        thread = threading.Thread(target=job.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 20
        while job.runs < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        job.stop()
        thread.join(timeout=20)
        assert not thread.is_alive() and job.runs >= 2 and job.failures == 0
        assert D1 not in rows_per_day(db)
    finally:
        fast.dispose()
    off = settings.model_copy(update={"retention_interval_seconds": 0})
    assert build_retention_job(Database(off)) is None


# --------------------------------------------------------------- PostgreSQL specifics


def leave_detach_pending(db: Database, url: str, name: str) -> None:
    """PostgreSQL: leave partition ``name`` half-detached, as a ``DETACH ... CONCURRENTLY``
    cancelled while it waits for older snapshots (a lock timeout, a deploy) does."""
    reader = psycopg.connect(url)  # an open snapshot the detach must wait for
    reader.execute("SELECT count(*) FROM ingress_events")
    detacher = psycopg.connect(url, autocommit=True)
    pid = detacher.info.backend_pid
    failed: list[BaseException] = []

    def detach() -> None:
        try:
            detacher.execute(f"ALTER TABLE ingress_events DETACH PARTITION {name} CONCURRENTLY")
        except psycopg.errors.QueryCanceled as exc:
            failed.append(exc)

    thread = threading.Thread(target=detach, daemon=True)
    thread.start()
    assert wait_for(
        lambda: (
            scalar(db, "SELECT wait_event_type FROM pg_stat_activity WHERE pid = :p", {"p": pid})
            == "Lock"
        )
    )
    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute("SELECT pg_cancel_backend(%s)", (pid,))
    thread.join(timeout=20)
    reader.rollback()
    reader.close()
    detacher.close()
    assert failed
    assert relations(db)[name] == "pending"


def pg_url(settings: Settings) -> str:
    return settings.database_url


@backends("postgresql")
def test_ingest_goes_on_while_a_partition_is_detached(
    settings: Settings, db: Database, members: Members
) -> None:
    """DETACH ... CONCURRENTLY waits for a transaction that uses ingress_events; meanwhile
    a batch for a live day is stored, and nobody holds ACCESS EXCLUSIVE on the parent."""
    ingest(db, day_events(D1, 300))
    ingest(db, day_events(D4, 10))
    assert drain(db, members, 310) == 310
    retention = build_retention(db)
    assert "ingress_events_p20300311" not in relations(db)  # to be created ahead by the run
    reader = psycopg.connect(pg_url(settings))
    result: list[RetentionReport] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            result.append(retention.run(AS_OF))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    seen: set[str] = set()
    sampling = threading.Event()

    def sample_locks() -> None:  # every lock mode anyone holds on the parent, meanwhile
        with psycopg.connect(pg_url(settings), autocommit=True) as conn:
            while not sampling.is_set():
                seen.update(
                    r[0]
                    for r in conn.execute(
                        "SELECT mode FROM pg_locks WHERE granted "
                        "AND relation = 'ingress_events'::regclass"
                    )
                )
                time.sleep(0.002)

    sampler = threading.Thread(target=sample_locks, daemon=True)
    sampler.start()
    try:
        # a long reader of a live day: holds ACCESS SHARE on ingress_events
        reader.execute(
            "SELECT count(*) FROM ingress_events WHERE occurred_at >= %s", (NOW - timedelta(1),)
        )
        thread.start()
        assert wait_for(
            lambda: (
                scalar(
                    db,
                    "SELECT count(*) FROM pg_stat_activity WHERE query ILIKE '%DETACH PARTITION%"
                    "CONCURRENTLY%' AND wait_event_type = 'Lock' AND state = 'active'",
                )
                == 1
            )
        ), "the detach never started waiting"
        started = time.monotonic()
        ingest(db, day_events(D4, 200, prefix="during-"))  # a COPY into a live partition
        assert time.monotonic() - started < 5
        modes = {
            r[0]
            for r in psycopg.connect(pg_url(settings), autocommit=True).execute(
                "SELECT mode FROM pg_locks WHERE relation = 'ingress_events'::regclass"
            )
        }
        assert "AccessExclusiveLock" not in modes
        assert thread.is_alive()  # still waiting for the reader
    finally:
        reader.rollback()
        reader.close()
    thread.join(timeout=30)
    sampling.set()
    sampler.join(timeout=10)
    assert not errors and result
    assert "AccessExclusiveLock" not in seen and "ShareUpdateExclusiveLock" in seen
    assert {d.day for d in result[0].dropped if d.rows} == {D1}
    assert relations(db)["ingress_events_p20300311"] == "attached"
    assert partition_name(D1) not in relations(db)
    assert rows_per_day(db) == {D4: 210}


@backends("postgresql")
def test_an_interrupted_detach_and_a_detached_leftover_are_finished(
    settings: Settings, db: Database, members: Members
) -> None:
    earlier = D1 - timedelta(days=2)  # attached and expired, before the half-detached day
    for day in (earlier, D1, D3):
        ingest(db, day_events(day, 100))
    assert drain(db, members, 300) == 300
    url = pg_url(settings)
    with psycopg.connect(url, autocommit=True) as conn:  # a crash after DETACH, before DROP
        conn.execute(f"ALTER TABLE ingress_events DETACH PARTITION {partition_name(D3)}")
    leave_detach_pending(db, url, partition_name(D1))
    assert relations(db)[partition_name(D1)] == "pending"
    assert relations(db)[partition_name(D3)] == "table"

    report = build_retention(db).run(AS_OF, strict=True)

    assert report.ok
    assert {d.day: d.rows for d in report.dropped if d.rows} == {earlier: 100, D1: 100, D3: 100}
    rels = relations(db)
    assert not {partition_name(d) for d in (earlier, D1, D3)} & set(rels)


@backends("postgresql")
def test_a_row_that_races_in_before_the_detach_puts_the_partition_back(
    db: Database, members: Members
) -> None:
    ingest(db, day_events(D1, 100))
    assert drain(db, members, 100) == 100
    store = PostgresRetentionStore(db)
    detach = store._autocommit

    def late_row_then_detach(statement: psycopg.sql.Composed) -> None:
        ingest(db, [IncomingEvent("racer", "racer", "logged_on", NOW - timedelta(days=3), "{}")])
        detach(statement)

    store._autocommit = late_row_then_detach  # type: ignore[method-assign]
    report = Retention(store, retention_days=7).run(AS_OF)
    assert report.kept == [KeptDay(D1, 1)]
    assert D1 not in {d.day for d in report.dropped}
    assert relations(db)[partition_name(D1)] == "attached"
    assert rows_per_day(db) == {D1: 101}
    assert drain(db, members, 1) == 1  # the pipeline still sees it
    assert build_retention(db).run(AS_OF, strict=True).ok
    assert partition_name(D1) not in relations(db)


def test_two_runs_at_once_without_the_lease_remove_nothing_still_needed(
    db: Database, members: Members
) -> None:
    """The lease may die with its session while a run goes on, and another process start
    one: every destructive step checks the database itself, so two runs at once (no
    lease at all here) still keep the unprocessed event and its day's cap counters."""
    ingest(db, day_events(D1, 300))
    ingest(db, day_events(D3, 300))
    d2 = NOW - timedelta(days=2)
    ingest(db, [IncomingEvent("early-1", "user-1", "logged_on", d2, "{}")])
    assert drain(db, members, 601) == 601
    ingest(db, [IncomingEvent("late-1", "user-1", "logged_on", d2, "{}")])
    caps_d2_before = caps_per_day(db)[D2]

    class Unleased:
        def __init__(self) -> None:
            self.store = create_retention_store(db)

        def __getattr__(self, name: str) -> Any:
            return getattr(self.store, name)

        @contextmanager
        def lease(self) -> Iterator[bool]:
            yield True

    failures: list[BaseException] = []

    def run() -> None:
        try:
            Retention(Unleased(), retention_days=7).run(AS_OF)  # type: ignore[arg-type]
        except (sa.exc.DBAPIError, psycopg.Error) as exc:  # a concurrent DDL may fail one run
            failures.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(failures) <= 1, failures
    final = build_retention(db).run(AS_OF)
    assert final.kept == [KeptDay(D2, 1)]
    assert rows_per_day(db).get(D2) == (1 if db.backend == "sqlite" else 2)
    assert D1 not in rows_per_day(db)
    assert D3 not in rows_per_day(db)
    assert caps_per_day(db).get(D2, 0) == caps_d2_before
    assert D1 not in caps_per_day(db) and D3 not in caps_per_day(db)


@backends("postgresql")
def test_the_dedup_keys_go_back_whole_with_their_generation(db: Database, members: Members) -> None:
    """The dedup keys are stored by the day they are received, in generations of eight
    days, one table each: retention drops a generation whose days have all expired, so
    its bytes go back to the file system (rows deleted from one table stayed as its pages,
    70 of the 91 MB per 1M events left after retention), and it takes no row-by-row
    DELETE. A generation still inside the window stays, and with it de-duplication."""
    day = date(2030, 4, 1)
    at = datetime(day.year, day.month, day.day, 12, tzinfo=UTC)
    ingest(db, day_events(day, prefix="gen-"), at=at)
    assert drain(db, members, PER_DAY) == PER_DAY
    today = datetime.now(UTC).date()
    current = key_generations(db)
    assert f"ingress_keys_g{key_generation(today):%Y%m%d}" in current
    assert key_count(db) == PER_DAY
    # as of eight days on (the cutoff tomorrow): today's generation stays
    kept = build_retention(db).run(
        datetime(today.year, today.month, today.day, 12, tzinfo=UTC) + timedelta(days=8)
    )
    assert kept.ok and key_count(db) == PER_DAY
    # as of 2030 (the events' day expired too): every generation received before goes
    report = build_retention(db).run(at + timedelta(days=9), strict=True)
    assert report.ok and key_count(db) == 0 and key_generations(db) == {}
    assert report.bytes_reclaimed >= sum(current.values()) > PER_DAY * 40
    # the next batch finds its generation gone and creates it again
    ingest(db, day_events(day + timedelta(days=10), prefix="again-"), at=at + timedelta(days=10))
    assert key_count(db) == PER_DAY
