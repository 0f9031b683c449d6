"""The ingress log on NATS JetStream (issue 31 part 2), in-process against a private
``nats-server -js`` per test (tests/conftest.py ``nats_server``) and a real database:
batches acknowledged after JetStream stored them, de-duplication past JetStream's own
window, the pipeline reading the stream exactly once, retention's hold, forget-me on the
stream's files, the storage report."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import orjson
import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from loyalty.adapters.db import Database
from loyalty.adapters.ingress_log import caps_partition_name, create_day_partition, partition_name
from loyalty.adapters.keys import KeyStore
from loyalty.adapters.nats_log import JetStreamIngressLog, jetstream_log, msg_id
from loyalty.adapters.pipeline_store import PipelineStore
from loyalty.adapters.storage import storage_report
from loyalty.api.app import create_app
from loyalty.application.access import Role
from loyalty.application.ingress import IngressRecord, shard_of
from loyalty.bootstrap import build_pipeline, build_projection, build_retention
from loyalty.config import Settings
from tests.conftest import NatsServer, backends, drain_with, on_jetstream
from tests.e2e.live import wait_for

BATCHES = "/v1/ingress/batches"


@pytest.fixture
def js_settings(settings: Settings, nats_server: NatsServer) -> Settings:
    return on_jetstream(
        settings, nats_server, forget_settle_seconds=0.0, marker_refresh_seconds=0.01
    )


@pytest.fixture
def js_db(js_settings: Settings) -> Iterator[Database]:
    database = Database(js_settings)
    yield database
    database.dispose()


@pytest.fixture
def js_client(js_settings: Settings, js_db: Database) -> Iterator[TestClient]:
    with TestClient(create_app(js_settings, db=js_db)) as c:
        yield c


def headers(db: Database, role: str = "ingest") -> dict[str, str]:
    return {"Authorization": f"Bearer {KeyStore(db).create(Role(role), 'src-' + role)}"}


def event(i: int, user: str, kind: str = "played_game", **extra: object) -> dict[str, object]:
    return {
        "event_id": f"e{i}",
        "user_id": user,
        "type": kind,
        "occurred_at": (datetime.now(UTC) - timedelta(minutes=i)).isoformat(),
        "attributes": {},
        **extra,
    }


def stream_count(db: Database) -> int:
    return jetstream_log(db).stream_bytes()[0]


def record(i: int, user: str, source: str = "src") -> IngressRecord:
    return IngressRecord(
        shard_of(user, 16), source, f"e{i}", user, "played_game", datetime.now(UTC), "{}"
    )


def test_a_batch_is_answered_after_jetstream_stored_it(
    js_client: TestClient, js_db: Database
) -> None:
    h = headers(js_db)
    events = [event(i, f"user-{i % 7}") for i in range(300)]
    body = js_client.post(BATCHES, json={"events": events}, headers=h).json()
    assert body["accepted"] == 300 and body["duplicates"] == 0
    assert stream_count(js_db) == 300  # stored when answered: no wait
    # the keys are confirmed with the sequences JetStream acknowledged
    with js_db.read() as conn:
        seqs = conn.execute(sa.text("SELECT seq FROM stream_ingress_keys")).scalars().all()
    assert sorted(seqs) == list(range(1, 301))

    # per-event results as on the database: a resend is a duplicate, other content a conflict
    again = [events[0], {**events[1], "type": "logged_on"}, event(1000, "user-1")]
    body = js_client.post(BATCHES, json={"events": again}, headers=h).json()
    assert body["accepted"] == 1
    assert [(d["index"], d["kind"]) for d in body["duplicate_events"]] == [
        (0, "repeat"),
        (1, "conflict"),
    ]
    assert stream_count(js_db) == 301


def test_a_batch_is_refused_while_jetstream_is_down(
    js_client: TestClient, js_db: Database, nats_server: NatsServer
) -> None:
    h = headers(js_db)
    assert js_client.get("/readyz").status_code == 200
    assert js_client.post(BATCHES, json={"events": [event(1, "u")]}, headers=h).status_code == 202
    nats_server.kill()
    # not ready while the activity log is gone (a balancer stops sending batches here),
    # answered within the probe's timeout
    started = time.monotonic()
    ready = js_client.get("/readyz")
    assert ready.status_code == 503, ready.text
    assert time.monotonic() - started < 5
    second = event(2, "u")
    resp = js_client.post(BATCHES, json={"events": [second]}, headers=h)
    assert resp.status_code == 503
    nats_server.start()
    assert wait_for(lambda: js_client.get("/readyz").status_code == 200)
    # the refused batch's key was claimed, never confirmed; its publish may still have
    # gone out when the client reconnected: the resend (same Nats-Msg-Id) stores it
    # once either way
    resp = js_client.post(BATCHES, json={"events": [second]}, headers=h)
    assert resp.status_code == 202
    assert resp.json()["accepted"] + resp.json()["duplicates"] == 1
    assert stream_count(js_db) == 2
    with js_db.read() as conn:
        unconfirmed = conn.execute(
            sa.text("SELECT count(*) FROM stream_ingress_keys WHERE seq IS NULL")
        ).scalar_one()
    assert unconfirmed == 0


@pytest.mark.slow  # waits out a 10 s duplicate window
def test_duplicates_are_refused_past_jetstreams_own_window(
    settings: Settings, nats_server: NatsServer
) -> None:
    """JetStream's Nats-Msg-Id window is 10 s here: a resend after it is still a
    duplicate (the database's key table), and a claim left by an API that died after
    its publish is found in the stream rather than published twice."""
    js = on_jetstream(settings, nats_server, ingress_duplicate_window_seconds=10.0)
    db = Database(js)
    try:
        log = jetstream_log(db)
        first = [record(i, f"u{i % 3}") for i in range(50)]
        assert log.store(first).inserted == 50
        # an API killed between its publish and its confirm (the message is stored, the
        # key claimed, never confirmed) and one killed before its publish
        orphan, unsent = record(900, "u1"), record(901, "u2")
        log._claim([orphan, unsent], [0, 0], datetime.now(UTC))
        assert log._client.run(log._publish([orphan]))[0][1] is False
        with db.write() as conn:  # the same content as the resend below
            from loyalty.adapters.nats_log import fingerprint

            for r in (orphan, unsent):
                conn.execute(
                    sa.text(
                        "UPDATE stream_ingress_keys SET fingerprint = :f "
                        "WHERE source = :s AND event_id = :e"
                    ),
                    {"f": fingerprint(r), "s": r.source, "e": r.event_id},
                )
        import time

        time.sleep(11)  # past JetStream's window
        stored = log.store([*first[:10], orphan, unsent])
        assert stored.inserted == 1  # only the event never published
        assert stored.not_stored == {**dict.fromkeys(range(10), False), 10: False}
        assert log.stream_bytes()[0] == 52
    finally:
        db.dispose()


def test_the_pipeline_reads_each_shard_once_in_order(
    js_client: TestClient, js_db: Database
) -> None:
    h = headers(js_db)
    users = [f"member-{i}" for i in range(40)]
    events = [event(i, users[i % 40], "joined_competition") for i in range(2000)]
    for start in range(0, 2000, 500):
        js_client.post(BATCHES, json={"events": events[start : start + 500]}, headers=h)
    pipeline = build_pipeline(js_db)
    pipeline.chunk = 37  # many windows per shard
    assert drain_with(pipeline, js_db) == 2000
    positions = PipelineStore(js_db).positions()
    # the checkpoint holds the stream sequence of the shard's last message
    for shard, (txid, seq) in positions.items():
        rows = jetstream_log(js_db).read_after(shard, (0, 0), 10**6)
        assert txid == 0 and (rows[-1].seq if rows else 0) == seq
    build_projection(js_db).catch_up()
    shop = headers(js_db, "shop")
    for user in users[:5]:  # 50 competitions each, capped per day by the defaults
        got = js_client.get(f"/v1/members/{user}", headers=shop).json()
        assert got["currency"] > 0
    assert PipelineStore(js_db).totals()[0] == 2000
    assert drain_with(build_pipeline(js_db), js_db) == 0  # nothing read twice


@backends("postgresql")
def test_the_cap_counters_partition_is_made_by_the_pipeline_and_goes_with_its_day(
    js_client: TestClient, js_db: Database
) -> None:
    """With the activity log on JetStream, ingest makes no day partition: the pipeline
    makes a day's cap counters' partition before it stores the day's first counter
    (migration 0023), and retention drops it once the day has expired."""
    events = [event(i, "capped-js", "joined_competition") for i in range(3)]
    js_client.post(BATCHES, json={"events": events}, headers=headers(js_db))
    assert drain_with(build_pipeline(js_db), js_db) == 3
    with js_db.read() as conn:
        days = set(
            conn.execute(
                sa.text("SELECT day FROM pipeline_caps WHERE user_id = 'capped-js'")
            ).scalars()
        )
        tables = set(conn.execute(sa.text("SELECT relname FROM pg_class")).scalars())
    assert days and {caps_partition_name(d) for d in days} <= tables
    later = datetime.now(UTC) + timedelta(days=js_db.settings.retention_days + 2)
    report = build_retention(js_db).run(later)
    assert report.cap_rows_deleted >= len(days)
    with js_db.read() as conn:
        tables = set(conn.execute(sa.text("SELECT relname FROM pg_class")).scalars())
    assert not {caps_partition_name(d) for d in days} & tables


def test_read_after_stops_at_the_noted_end_and_resumes(js_db: Database) -> None:
    log = jetstream_log(js_db)
    log.store([record(i, "same-user") for i in range(30)])
    shard = shard_of("same-user", 16)
    first = log.read_after(shard, (0, 0), 10, upto=(0, 5))
    assert [r.seq for r in first] == [1, 2, 3, 4, 5]
    rest = log.read_after(shard, (0, 5), 100)
    assert [r.seq for r in rest] == list(range(6, 31))
    again = log.read_after(shard, (0, 2), 3)  # backwards (a window re-read after a crash)
    assert [r.seq for r in again] == [3, 4, 5]
    assert log.read_after(shard, (0, 30), 100) == []


def test_retention_holds_an_unprocessed_day(js_db: Database) -> None:
    """max_age expires messages; one not yet processed is kept by raising it."""
    log = jetstream_log(js_db)
    log.store([record(1, "u")])
    configured = log.max_age
    now = datetime.now(UTC)
    assert log.hold(None, now) == configured
    # the pipeline is 9 days behind with an 8-day max_age: held past the oldest
    held = log.hold(now - timedelta(days=9), now)
    assert held >= timedelta(days=10)
    assert timedelta(seconds=log.info().config.max_age or 0) == held
    assert log.hold(None, now) == configured  # caught up: back to the configured age
    assert timedelta(seconds=log.info().config.max_age or 0) == configured


@backends("postgresql")
def test_retention_finishes_a_half_detached_day_before_the_others(
    js_settings: Settings, js_db: Database
) -> None:
    """With the activity log on JetStream the day partitions stay (empty) and retention
    still drops them: a half-detached one must go first there too (it blocks every other
    detach), whatever days the stream's keys add to the list."""
    from tests.integration.test_retention import leave_detach_pending, relations

    earlier, pending = date(2030, 2, 27), date(2030, 3, 1)
    try:
        for day in (earlier, pending):
            create_day_partition(js_db, day)
        leave_detach_pending(js_db, js_settings.database_url, partition_name(pending))
        report = build_retention(js_db).run(datetime(2030, 3, 11, 6, tzinfo=UTC), strict=True)
        assert report.ok, report
        assert not {partition_name(d) for d in (earlier, pending)} & set(relations(js_db))
    finally:
        with js_db.write() as conn:  # the session's database is shared: no 2030 days left
            for name in relations(js_db):
                conn.execute(sa.text(f'DROP TABLE IF EXISTS "{name}"'))


def test_storage_reports_the_stream(js_db: Database) -> None:
    log = jetstream_log(js_db)
    log.store([record(i, "u") for i in range(20)])
    report = storage_report(js_db)
    found = [loc for loc in report.locations if loc.name == f"stream:{log.stream}"]
    assert len(found) == 1 and found[0].rows == 20 and found[0].bytes > 0
    assert found[0].kind == "ingress"


def files_contain(store: Path, marker: str) -> list[str]:
    return [str(p) for p in store.rglob("*") if p.is_file() and marker.encode() in p.read_bytes()]


def test_forget_me_erases_the_member_from_the_stream_files(
    js_client: TestClient, js_db: Database, nats_server: NatsServer
) -> None:
    marker = f"canary-{uuid.uuid4().hex}"
    h = headers(js_db)
    events = [event(i, marker, attributes={"note": marker}) for i in range(3)]
    events.append(event(3, "bystander", "joined_competition"))
    assert js_client.post(BATCHES, json={"events": events}, headers=h).json()["accepted"] == 4
    assert files_contain(nats_server.store, marker)  # the canary is in the stream's files
    drain_with(build_pipeline(js_db), js_db)
    operator = headers(js_db, "operator")
    accepted = js_client.post("/v1/forget-requests", json={"user_id": marker}, headers=operator)
    assert accepted.status_code == 202
    assert js_client.app.state.container.forget.run_pending() == 1  # type: ignore[attr-defined]
    receipt = js_client.get(
        f"/v1/forget-requests/{accepted.json()['request_id']}", headers=operator
    ).json()
    assert receipt["status"] == "completed"
    assert receipt["erased"]["ingress_stream"] == 3
    assert files_contain(nats_server.store, marker) == []
    log = jetstream_log(js_db)
    assert log.stream_bytes()[0] == 1  # the bystander's
    with js_db.read() as conn:  # and the keys of the erased events
        left = conn.execute(sa.text("SELECT event_id FROM stream_ingress_keys")).scalars().all()
    assert left == ["e3"]
    # a restart of the server finds nothing of the canary either (no log replays it)
    nats_server.restart()
    assert files_contain(nats_server.store, marker) == []
    assert orjson.loads(orjson.dumps(log.stream_bytes()))[0] == 1


def test_msg_id_is_header_safe() -> None:
    assert len(msg_id("src", "e\r\n1")) == 32 and msg_id("a", "b") != msg_id("a\x00b", "")


def test_jetstream_log_is_chosen_by_the_url(js_db: Database) -> None:
    from loyalty.bootstrap import ingress_log

    assert isinstance(ingress_log(js_db), JetStreamIngressLog)


def test_retention_keeps_the_keys_of_an_unprocessed_day(js_db: Database) -> None:
    from loyalty.bootstrap import build_retention

    log = jetstream_log(js_db)
    old = datetime.now(UTC) - timedelta(days=10)
    records = [
        IngressRecord(shard_of(f"u{i}", 16), "src", f"old{i}", f"u{i}", "logged_on", old, "{}")
        for i in range(20)
    ]
    log.store(records)
    retention = build_retention(js_db)
    report = retention.run(datetime.now(UTC))
    assert [(k.day, k.unprocessed_rows) for k in report.kept] == [(old.date(), 20)]

    def keys() -> int:
        with js_db.read() as conn:
            return int(
                conn.execute(sa.text("SELECT count(*) FROM stream_ingress_keys")).scalar_one()
            )

    assert keys() == 20  # a resend is still a duplicate while the day is kept
    drain_with(build_pipeline(js_db), js_db)
    report = retention.run(datetime.now(UTC))
    assert report.kept == [] and keys() == 0
    assert log.stream_bytes()[0] == 20  # the messages go by max_age, not by retention


def test_read_day_returns_a_days_events_of_a_shard(js_db: Database) -> None:
    """The rule dry run's read: the shard's events that occurred on the day."""
    log = jetstream_log(js_db)
    today = datetime.now(UTC)
    yesterday = today - timedelta(days=1)
    user = "dry-run-user"
    shard = shard_of(user, 16)
    records = [
        IngressRecord(shard, "src", f"d{i}", user, "played_game", (today, yesterday)[i % 2], "{}")
        for i in range(10)
    ]
    log.store(records)
    rows = log.read_day(yesterday.date(), shard, (0, 0), 100)
    assert [r.event_id for r in rows] == ["d1", "d3", "d5", "d7", "d9"]
    assert [r.event_id for r in log.read_day(yesterday.date(), shard, rows[1].position, 2)] == [
        "d5",
        "d7",
    ]
    assert log.read_day(today.date(), shard, (0, 0), 100, received_before=yesterday) == []
