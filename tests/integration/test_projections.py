"""Read-model projections on both backends: exactly once, equal to a rebuild, surviving a
kill -9 of the process that runs them."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import sqlalchemy as sa

from loyalty.adapters.db import Database
from loyalty.adapters.event_store import event_store_env
from loyalty.adapters.read_models import ReadModels
from loyalty.application.accounts import Accounts, AwardCommand, Members, Spending
from loyalty.application.projections import PROJECTION_NAME, MemberProjection
from loyalty.config import Settings
from loyalty.domain.errors import InsufficientFunds
from loyalty.domain.member import Member, account_events
from loyalty.domain.ranks import Rank, RankLadder
from loyalty.worker import projection_lease
from tests.e2e.live import LOYALTY, env_for

LADDER = RankLadder((Rank("bronze", 0), Rank("silver", 30), Rank("gold", 200)))


@pytest.fixture
def members(settings: Settings) -> Iterator[Members]:
    app = Members(env=event_store_env(settings))
    yield app
    app.close()


def seed(members: Members, users: int, rounds: int, tag: str = "") -> None:
    """Awards, spends, refunds and adjustments across ``users`` members."""
    accounts = Accounts(members)
    spending = Spending(accounts)
    for r in range(rounds):
        accounts.award_many(
            [
                AwardCommand(f"u{u:04d}", f"w{tag}{r}", 10 + u % 7, 5 + u % 11, 1, 1)
                for u in range(users)
            ],
            LADDER,
        )
        for u in range(0, users, 3):
            try:
                spending.spend(f"u{u:04d}", f"o{tag}{r}", 4)
            except InsufficientFunds:
                pass
            if r % 2:
                spending.refund(f"u{u:04d}", f"o{tag}{r}")
        if r % 3 == 0:
            spending.adjust(f"u{r:04d}", f"adj{tag}{r}", -1, 20, "correction", LADDER)


def rebuilt(db: Database, members: Members) -> dict[str, list[tuple[Any, ...]]]:
    projection = MemberProjection(members, ReadModels(db), batch_size=97)
    projection.reset()
    projection.catch_up()
    return ReadModels(db).snapshot()


def assert_matches_aggregates(db: Database, members: Members) -> None:
    """Balances equal the aggregates' and there is one history row per event (bar
    Created): nothing applied twice, nothing lost."""
    snapshot = ReadModels(db).snapshot()
    accounts = Accounts(members)
    events = 0
    for user_id, _mid, currency, points, lifetime, _at in snapshot["member_balances"]:
        member = accounts.get(user_id)
        assert (currency, points, lifetime) == (
            member.currency,
            member.rank_points,
            member.lifetime_currency,
        ), user_id
        # one line per account event bar Created (an Enrolled is three: Created, ...)
        stored = members.events.get(Member.create_id(user_id))
        events += sum(len(account_events(e)) for e in stored) - 1
    assert len(snapshot["member_history"]) == events
    head = members.recorder.max_notification_id()
    assert ReadModels(db).position(PROJECTION_NAME) == head


def test_live_projection_in_small_batches_equals_a_rebuild(db: Database, members: Members) -> None:
    read_models = ReadModels(db)
    live = MemberProjection(members, read_models, batch_size=7)
    seed(members, 20, 3, "a")
    live.step()
    live.step()
    seed(members, 25, 2, "b")  # writes between batches
    live.catch_up()
    seed(members, 5, 1, "c")
    assert live.catch_up() > 0
    assert live.catch_up() == 0  # caught up: nothing applied twice
    live_rows = read_models.snapshot()
    assert len(live_rows["member_balances"]) == 25
    assert_matches_aggregates(db, members)
    assert rebuilt(db, members) == live_rows


def test_two_runners_at_once_never_double_apply(db: Database, members: Members) -> None:
    """Without the lease, the conditional tracking update still applies each batch once."""
    seed(members, 30, 4)
    runners = [MemberProjection(members, ReadModels(db), batch_size=11) for _ in range(3)]
    with ThreadPoolExecutor(len(runners)) as pool:
        # .result() re-raises a runner's error: a crashed runner is a failure, not a gap
        # the serial catch-up below would fill
        racing = [f.result() for f in [pool.submit(r.catch_up) for r in runners]]
    serial = [r.catch_up() for r in runners]
    # each event applied by exactly one runner (a runner that lost a race re-reads and
    # stops; the serial pass applies what is left)
    events = len(members.recorder.select_notifications(1, 10**6))
    assert sum(racing) + sum(serial) == events, (racing, serial, events)
    assert sum(racing) > 0
    assert_matches_aggregates(db, members)
    assert rebuilt(db, members) == ReadModels(db).snapshot()


def test_history_rows_carry_signed_amounts_and_refs(db: Database, members: Members) -> None:
    accounts = Accounts(members)
    accounts.award_many([AwardCommand("amy", "w1", 50, 40, 3, 1)], LADDER)
    spending = Spending(accounts)
    spending.spend("amy", "ord", 20)
    spending.refund("amy", "ord")
    spending.adjust("amy", "fix", -5, -15, "typo", LADDER)
    MemberProjection(members, ReadModels(db)).catch_up()
    rows = ReadModels(db).history("amy", 50)
    assert [(r.kind, r.currency, r.rank_points, r.ref) for r in rows] == [
        ("rank_changed", 0, 0, "bronze"),
        ("adjustment", -5, -15, "fix"),
        ("refund", 20, 0, "ord"),
        ("spend", -20, 0, "ord"),
        ("rank_changed", 0, 0, "silver"),
        ("award", 50, 40, "w1"),
    ]
    assert [r.position for r in rows] == sorted((r.position for r in rows), reverse=True)
    assert all(r.at.utcoffset() is not None and r.at.utcoffset().total_seconds() == 0 for r in rows)
    assert ReadModels(db).history("amy", 2, before=rows[1].position) == rows[2:4]
    board = ReadModels(db).leaderboard(10)
    assert [(b.user_id, b.rank_points) for b in board] == [("amy", 25)]


def test_rebuild_command_gives_the_same_rows_and_respects_the_lease(
    settings: Settings, db: Database, members: Members
) -> None:
    seed(members, 15, 3)
    MemberProjection(members, ReadModels(db), batch_size=13).catch_up()
    live = ReadModels(db).snapshot()
    done = subprocess.run(
        [*LOYALTY, "projections", "rebuild", "--batch", "10"],
        env=env_for(settings.database_url),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "rebuilt read models" in done.stdout
    assert ReadModels(db).snapshot() == live
    # while another process holds the projection's lease, a rebuild refuses to start
    holder = Database(settings)
    try:
        lease = projection_lease(holder)
        assert lease.try_acquire()
        refused = subprocess.run(
            [*LOYALTY, "projections", "rebuild"],
            env=env_for(settings.database_url),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert refused.returncode == 1 and "stop it first" in refused.stderr
        lease.release()
    finally:
        holder.dispose()


def _position(db: Database) -> int:
    return ReadModels(db).position(PROJECTION_NAME)


def _start_worker(url: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [*LOYALTY, "worker", "--projection-batch", "3"],
        env=env_for(url),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


@pytest.mark.slow
def test_kill_9_of_the_projection_process_then_restart_equals_a_rebuild(
    settings: Settings, db: Database, members: Members
) -> None:
    seed(members, 120, 4)
    head = members.recorder.max_notification_id()
    assert head is not None and head > 600
    kills = 0
    for _ in range(2):  # kill it twice, each time mid-stream
        proc = _start_worker(settings.database_url)
        try:
            deadline = time.monotonic() + 60
            start = _position(db)
            while _position(db) < start + 30:
                assert proc.poll() is None, "worker exited"
                assert time.monotonic() < deadline, "projection made no progress"
                time.sleep(0.02)
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        assert 0 < _position(db) < head, "the kill was not mid-stream"
        kills += 1
    seed(members, 10, 1, "late")  # more events while nobody projects
    head = members.recorder.max_notification_id()
    proc = _start_worker(settings.database_url)
    try:
        deadline = time.monotonic() + 120
        while _position(db) < head:
            assert proc.poll() is None, "worker exited"
            assert time.monotonic() < deadline, "projection did not catch up"
            time.sleep(0.05)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert kills == 2
    after_restart = ReadModels(db).snapshot()
    assert_matches_aggregates(db, members)
    assert rebuilt(db, members) == after_restart


def test_member_ids_map_back_to_user_ids(db: Database, members: Members) -> None:
    Accounts(members).award_many([AwardCommand("zoe", "w", 1, 1, 1, 1)], LADDER)
    MemberProjection(members, ReadModels(db)).catch_up()
    assert ReadModels(db).user_ids([str(Member.create_id("zoe"))]) == {
        str(Member.create_id("zoe")): "zoe"
    }


def plant_orphan(db: Database, members: Members, user_id: str) -> int:
    """A stream without its first event (what the old forget-me race left behind):
    saved through the event store, then its Created row deleted directly. Returns how
    many events are left in it."""
    accounts = Accounts(members)
    accounts.award_many([AwardCommand(user_id, "g1", 50, 40, 1, 1)], LADDER)
    accounts.award_many([AwardCommand(user_id, "g2", 5, 1, 1, 1)], LADDER)
    member_id = Member.create_id(user_id)
    table, key = (
        ("members_events", str(member_id))
        if db.backend == "postgresql"
        else ("stored_events", member_id.hex)
    )
    with db.write() as conn:
        conn.execute(
            sa.text(f"DELETE FROM {table} WHERE originator_id = :m AND originator_version = 1"),
            {"m": key},
        )
        return int(
            conn.execute(
                sa.text(f"SELECT count(*) FROM {table} WHERE originator_id = :m"), {"m": key}
            ).scalar_one()
        )


def test_an_unprojectable_event_is_quarantined_and_the_projection_goes_on(
    db: Database, members: Members, caplog: pytest.LogCaptureFixture
) -> None:
    from loyalty.observability import Metrics

    seed(members, users=6, rounds=2)
    left = plant_orphan(db, members, "ghost")
    seed(members, users=6, rounds=2, tag="b")
    metrics = Metrics(process=False)
    projection = MemberProjection(members, ReadModels(db), batch_size=7, metrics=metrics)
    with caplog.at_level("ERROR", logger="loyalty.application.projections"):
        projection.catch_up()
    assert projection.position() == projection.head()  # it did not stop at the orphan
    held = ReadModels(db).quarantined()
    assert len(held) == left and {q.event.member_id for q in held} == {
        str(Member.create_id("ghost"))
    }
    assert all("no balance row" in q.event.error for q in held)
    logged = [r for r in caplog.records if "quarantined" in r.getMessage()]
    assert len(logged) == 1  # once per stream
    counted = metrics.registry.get_sample_value(
        "loyalty_projection_events_quarantined_total", {"projection": PROJECTION_NAME}
    )
    assert counted == left
    assert_matches_aggregates_except(db, members, "ghost")
    # later events of everyone else still reach the read models
    seed(members, users=6, rounds=1, tag="c")
    projection.catch_up()
    live = ReadModels(db).snapshot()
    assert any(h[6] == "wc0" for h in live["member_history"])
    assert rebuilt(db, members) == live  # a rebuild equals the live read models
    assert ReadModels(db).quarantined_count() == left  # and quarantines the same again


def assert_matches_aggregates_except(db: Database, members: Members, orphan: str) -> None:
    snapshot = ReadModels(db).snapshot()
    assert orphan not in {r[0] for r in snapshot["member_balances"]}
    assert orphan not in {r[0] for r in snapshot["member_history"]}
    assert_matches_aggregates(db, members)


def test_an_event_the_read_model_cannot_store_is_quarantined_and_later_ones_arrive(
    db: Database, members: Members
) -> None:
    """An ``Adjusted`` saved straight into the event store (bypassing the domain's
    bounds) with an amount beyond a 64-bit integer: SQLite raises OverflowError binding
    it, PostgreSQL 'bigint out of range'. The projection (as the worker builds it)
    quarantines that one event, says so (read models, metrics, doctor) and goes on: a
    later adjustment of another member reaches the history."""
    from loyalty.adapters.doctor import Doctor
    from loyalty.bootstrap import build_projection
    from loyalty.observability import Metrics

    spending = Spending(Accounts(members))
    spending.adjust("before", "a0", 5, 0, "first", LADDER)
    huge = Member(user_id="huge")
    huge._adjusted(  # the private event method: what no entrypoint may do
        adjustment_id="x",
        currency=2**64,
        rank_points=10**30,
        reason="overflow",
        source=None,
        lot=None,
        on=None,
    )
    members.save(huge)
    spending.adjust("after", "a1", 7, 3, "later", LADDER)
    metrics = Metrics(process=False)
    projection = build_projection(db, members, metrics=metrics)
    projection.catch_up()
    assert projection.position() == projection.head()
    history = ReadModels(db).history("after", 10)
    assert ("adjustment", 7, "a1") in [(h.kind, h.currency, h.ref) for h in history]
    held = ReadModels(db).quarantined()
    assert [q.event.topic for q in held] == ["Adjusted"]
    assert held[0].event.member_id == str(Member.create_id("huge"))
    counted = metrics.registry.get_sample_value(
        "loyalty_projection_events_quarantined_total", {"projection": PROJECTION_NAME}
    )
    assert counted == 1
    report = Doctor(db).examine()
    assert report.quarantined == 1 and report.quarantined_streams == [held[0].event.member_id]
    # and it keeps going for everyone else afterwards
    spending.adjust("after", "a2", 1, 0, "again", LADDER)
    projection.catch_up()
    later = ReadModels(db).history("after", 10)
    assert [h.ref for h in later if h.kind == "adjustment"] == ["a2", "a1"]
