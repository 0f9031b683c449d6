"""Constant-size member accounts on both backends: snapshots every N events (loads read
the latest snapshot and the events after it), erased by forget-me, and accounts stored
by the version-1 code (every award id in the state) still load and behave the same."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
import sqlalchemy as sa
from eventsourcing.application import AggregateNotFoundError
from eventsourcing.persistence import StoredEvent
from hypothesis import given
from hypothesis import settings as examples
from hypothesis import strategies as st

from loyalty.adapters.db import Database
from loyalty.adapters.event_store import event_store_env, stream_loader
from loyalty.application.accounts import Accounts, AwardCommand, Members, Spending
from loyalty.application.commands.rules import parse_rule_set
from loyalty.bootstrap import build_forget_service, streaming_accounts
from loyalty.config import Settings
from loyalty.domain.errors import (
    AdjustmentConflict,
    DomainError,
    OrderConflict,
    RefundConflict,
    RefundExceedsOrder,
)
from loyalty.domain.member import Member, replay, scoped_key
from loyalty.domain.rules import DEFAULT_RULES_WIRE

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "member_stream_v1.json"
RANKS = parse_rule_set(DEFAULT_RULES_WIRE, 1).ranks
TIMES = {"_id", "_created_on", "_modified_on", "_pending_events"}


def members_app(settings: Settings, interval: int) -> Members:
    return Members(env=event_store_env(settings.model_copy(update={"snapshot_interval": interval})))


@pytest.fixture
def apps(settings: Settings) -> Iterator[list[Members]]:
    """Applications a test opens (closed after it)."""
    opened: list[Members] = []
    yield opened
    for app in opened:
        app.close()


def opened(apps: list[Members], app: Members) -> Members:
    apps.append(app)
    return app


def tables(settings: Settings) -> tuple[str, str]:
    if settings.backend == "sqlite":
        return "stored_events", "stored_snapshots"
    return "members_events", "members_snapshots"


def stored_id(settings: Settings, member_id: UUID) -> Any:
    return member_id.hex if settings.backend == "sqlite" else member_id


def snapshot_versions(app: Members, member_id: UUID) -> list[int]:
    assert app.snapshots is not None
    return [s.originator_version for s in app.snapshots.get(member_id)]


def from_events(app: Members, member_id: UUID) -> Member:
    return replay(app.events.get(member_id))


def drop_events_upto(settings: Settings, member_id: UUID, version: int) -> None:
    """Delete a stream's events up to ``version``: a later load can only come from a
    snapshot (proof that loads use them)."""
    events, _ = tables(settings)
    db = Database(settings)
    try:
        with db.engine.begin() as conn:
            conn.execute(
                sa.text(
                    f"DELETE FROM {events} WHERE originator_id = :m AND originator_version <= :v"
                ),
                {"m": stored_id(settings, member_id), "v": version},
            )
    finally:
        db.dispose()


# ------------------------------------------------------------------ snapshots


def test_a_snapshot_gives_back_the_same_member_and_the_same_replay_rules() -> None:
    """Through the JSON transcoder: sets (refunded orders, other award ids) and
    adjustments must come back as they were, or replays change meaning."""
    app = Members(env={"PERSISTENCE_MODULE": "eventsourcing.popo"})
    member = Member(user_id="snap")
    member.award("w2.40.1", 100, 1200, 3, 1, RANKS)
    member.award("seed", 5, 5, 1, 1, RANKS)
    member.spend("o1", 30)
    member.spend("o2", 10)
    member.refund("o1")
    member.adjust("a1", -5, 10, "fix", RANKS)
    member.collect_events()
    stored = app.mapper.to_stored_event(Member.Snapshot.take(member))
    assert f'"class_version":{Member.class_version}'.encode() in stored.state
    back = app.mapper.to_domain_event(stored).mutate(None)  # type: ignore[attr-defined]

    assert back == member
    assert back.adjust("a1", -5, 10, "fix", RANKS) is False  # a replay, not a conflict
    with pytest.raises(AdjustmentConflict):
        back.adjust("a1", -5, 11, "fix", RANKS)
    assert back.refund("o1") == 30 and back.spend("o2", 10) == 10
    with pytest.raises(OrderConflict):
        back.spend("o2", 11)
    assert back.award("w2.40.1", 1, 1, 1, 1, RANKS) is False
    assert back.award("seed", 1, 1, 1, 1, RANKS) is False
    assert back.collect_events() == []


def test_snapshots_every_interval_and_loads_read_the_latest_one(
    settings: Settings, apps: list[Members]
) -> None:
    writer = opened(apps, members_app(settings, 10))
    accounts = Accounts(writer)
    for n in range(1, 31):  # Created + 30 awards (+ rank changes)
        accounts.award_many([AwardCommand("heavy", f"w1.{n}.0", 7, 50, 1, 1)], RANKS)
    member_id = Member.create_id("heavy")
    whole = from_events(writer, member_id)
    assert whole.version > 30
    versions = snapshot_versions(writer, member_id)
    # one per save that reached a multiple of 10, at the member's version after it
    assert len(versions) == whole.version // 10
    assert all(v % 10 in (0, 1) for v in versions)
    latest = versions[-1]

    drop_events_upto(settings, member_id, latest)
    cold = opened(apps, members_app(settings, 10))
    loaded = cold.repository.get(member_id)
    assert loaded == whole and loaded.currency == 210
    # the worker's bulk loader too: the latest snapshot, then only the events after it
    assert cold.snapshots is not None
    load = stream_loader(cold.recorder, cold.snapshots.recorder)
    stored = load([member_id, Member.create_id("nobody")])
    assert [s.originator_version for s in stored] == list(range(latest, whole.version + 1))
    assert stored[0].topic == "eventsourcing.domain:Snapshot"
    empty = opened(apps, members_app(settings, 10))
    Accounts(empty, lambda _app: load).prefetch(["heavy", "nobody"])
    assert empty.repository.cache is not None
    assert empty.repository.cache.get(member_id) == whole


def test_a_prefetch_made_before_the_markers_were_read_stays_cached(
    db: Database, apps: list[Members]
) -> None:
    """The forget markers' first read in a process replaces the accounts' cache (it cannot
    know what changed before it). A batch job's first page (the expiry job prefetches
    before any member is read) was loaded, dropped at the first read, and read again
    member by member: the prefetch now takes the markers' view first."""
    users = [f"page-{i}" for i in range(5)]
    writer = Accounts(opened(apps, members_app(db.settings, 0)))
    writer.award_many([AwardCommand(u, "w1.1.0", 1, 1, 1, 1) for u in users], RANKS)
    accounts = streaming_accounts(db, opened(apps, members_app(db.settings, 0)))
    accounts.prefetch(users)
    assert accounts.get(users[0]).currency == 1  # the first read asks the markers
    cache = accounts.app.repository.cache
    assert cache is not None
    for user in users:
        assert cache.get(Member.create_id(user)).currency == 1  # no KeyError: still loaded


def test_interval_zero_takes_no_snapshots(settings: Settings, apps: list[Members]) -> None:
    app = opened(apps, members_app(settings, 0))
    for n in range(1, 15):
        Accounts(app).award_many([AwardCommand("light", f"w1.{n}.0", 1, 1, 1, 1)], RANKS)
    assert snapshot_versions(app, Member.create_id("light")) == []


def test_forget_me_erases_the_members_snapshots(settings: Settings, apps: list[Members]) -> None:
    fast = settings.model_copy(update={"snapshot_interval": 2, "forget_settle_seconds": 0.0})
    app = opened(apps, Members(env=event_store_env(fast)))
    accounts = Accounts(app)
    for n in range(1, 8):
        accounts.award_many(
            [AwardCommand(u, f"w1.{n}.0", 1, 1, 1, 1) for u in ("victim", "bystander")], RANKS
        )
    victim, bystander = Member.create_id("victim"), Member.create_id("bystander")
    assert snapshot_versions(app, victim) and snapshot_versions(app, bystander)

    db = Database(fast)
    try:
        service = build_forget_service(db, accounts)
        service.request("victim")
        assert service.run_pending() == 1
        _, snapshots = tables(settings)
        with db.read() as conn:
            left = conn.execute(
                sa.text(f"SELECT count(*) FROM {snapshots} WHERE originator_id = :m"),
                {"m": stored_id(settings, victim)},
            ).scalar()
    finally:
        db.dispose()
    assert left == 0
    assert snapshot_versions(app, victim) == []
    cold = opened(apps, members_app(fast, 2))
    with pytest.raises(AggregateNotFoundError):  # no snapshot left to rebuild it from
        cold.repository.get(victim)
    assert cold.repository.get(bystander).currency == 7


def test_a_snapshot_taken_after_the_erasure_deleted_the_stream_is_not_stored(
    settings: Settings, apps: list[Members]
) -> None:
    """A snapshot goes in after its events, in a transaction of its own: one that lands
    after forget-me deleted the stream would bring the erased account back (loads start
    from the latest snapshot). The snapshot recorder stores it only while the event it
    stands for exists, checked under a lock that conflicts with the erasure's delete."""
    app = opened(apps, members_app(settings, 0))  # no automatic snapshots: taken by hand
    accounts = Accounts(app)
    accounts.award_many([AwardCommand(u, "w1.1.0", 5, 5, 1, 1) for u in ("erased", "kept")], RANKS)
    erased, kept = accounts.get("erased"), accounts.get("kept")
    db = Database(settings)
    try:
        from loyalty.adapters.event_store import erase_stream

        assert erase_stream(db, str(erased.id)) > 0
    finally:
        db.dispose()
    assert app.snapshots is not None
    app.snapshots.put([Member.Snapshot.take(erased), Member.Snapshot.take(kept)])
    assert snapshot_versions(app, erased.id) == []
    assert snapshot_versions(app, kept.id) == [kept.version]
    cold = opened(apps, members_app(settings, 0))
    with pytest.raises(AggregateNotFoundError):
        cold.repository.get(erased.id)
    assert cold.repository.get(kept.id).currency == 5


# ------------------------------------------------------------ version-1 accounts


def store_v1_stream(app: Members) -> tuple[dict[str, Any], UUID]:
    fixture = json.loads(FIXTURE.read_text())
    member_id = Member.create_id(fixture["user_id"])
    app.recorder.insert_events(
        [
            StoredEvent(member_id, e["originator_version"], e["topic"], e["state"].encode())
            for e in fixture["events"]
        ]
    )
    return fixture, member_id


def check_v1_account(app: Members, expected: dict[str, Any]) -> None:
    """Balances, replays of old award ids, orders and adjustments as version 1 had them."""
    accounts, spending = Accounts(app), Spending(Accounts(app))
    member = accounts.get("legacy-1")
    assert (
        member.currency,
        member.rank_points,
        member.lifetime_currency,
        member.rank,
        member.orders,
        sorted(member.refunded_orders),
    ) == (
        expected["currency"],
        expected["rank_points"],
        expected["lifetime_currency"],
        expected["rank"],
        {scoped_key(None, k): v for k, v in expected["orders"].items()},
        sorted(scoped_key(None, k) for k in expected["refunded_orders"]),
    )
    assert {k: [a.currency, a.rank_points, a.reason] for k, a in member.adjustments.items()} == (
        {scoped_key(None, k): v for k, v in expected["adjustments"].items()}
    )
    old = [AwardCommand("legacy-1", award_id, 99, 99, 1, 1) for award_id in expected["award_ids"]]
    assert accounts.award_many(old, RANKS) == 0
    # the answers of replayed commands are the first ones (balance right after them)
    assert spending.spend("legacy-1", "o2", 20).currency == 30
    assert spending.refund("legacy-1", "o1").currency == 60
    assert spending.adjust("legacy-1", "adj-1", 7, -50, "goodwill", RANKS).currency == 67
    with pytest.raises(OrderConflict):
        spending.spend("legacy-1", "o2", 21)
    with pytest.raises(AdjustmentConflict):
        spending.adjust("legacy-1", "adj-2", -2, 1000, "other reason", RANKS)
    assert accounts.get("legacy-1").currency == expected["currency"]


def test_a_stream_stored_by_version_1_loads_and_behaves_the_same(
    settings: Settings, apps: list[Members]
) -> None:
    app = opened(apps, members_app(settings, 15))
    fixture, member_id = store_v1_stream(app)
    expected = fixture["expected"]
    check_v1_account(app, expected)
    assert snapshot_versions(app, member_id) == []

    # new activity on the old account: a new window of shard 3 (the 15th event: a
    # version-2 snapshot) and a spend; then everything again, loaded from that snapshot
    accounts, spending = Accounts(app), Spending(Accounts(app))
    assert accounts.award_many([AwardCommand("legacy-1", "w3.7011.0", 10, 1, 1, 2)], RANKS) == 1
    assert spending.spend("legacy-1", "o3", 5).currency == expected["currency"] + 10 - 5
    assert snapshot_versions(app, member_id) == [15]
    whole = from_events(app, member_id)
    cold = opened(apps, members_app(settings, 15))
    assert cold.repository.get(member_id) == whole
    after = {
        **expected,
        "currency": expected["currency"] + 5,
        "rank_points": expected["rank_points"] + 1,
        "lifetime_currency": expected["lifetime_currency"] + 10,
        "orders": {**expected["orders"], "o3": 5},
    }
    check_v1_account(cold, after)
    assert (
        Accounts(cold).award_many([AwardCommand("legacy-1", "w3.7011.0", 1, 1, 1, 2)], RANKS) == 0
    )
    drop_events_upto(settings, member_id, 15)  # the snapshot alone carries the old state
    assert opened(apps, members_app(settings, 15)).repository.get(member_id) == whole


def test_a_version_1_snapshot_is_upcast(settings: Settings, apps: list[Members]) -> None:
    """A snapshot of the version-1 state (no ``class_version``: every award id, tuples as
    JSON lists) loads through ``Member.upcast_v1_v2``."""
    app = opened(apps, members_app(settings, 0))
    fixture, member_id = store_v1_stream(app)
    expected = fixture["expected"]
    whole = from_events(app, member_id)
    v1_state = {
        "_created_on": whole.created_on,
        "_modified_on": whole.modified_on,
        "user_id": "legacy-1",
        "currency": expected["currency"],
        "rank_points": expected["rank_points"],
        "lifetime_currency": expected["lifetime_currency"],
        "rank": expected["rank"],
        "award_ids": expected["award_ids"],
        "orders": expected["orders"],
        "refunded_orders": expected["refunded_orders"],
        "adjustments": expected["adjustments"],
    }
    snapshot = Member.Snapshot(  # type: ignore[call-arg]
        originator_id=member_id,
        originator_version=expected["version"],
        timestamp=datetime.now(UTC),
        topic="loyalty.domain.member:Member",
        state=v1_state,
    )
    stored = app.mapper.to_stored_event(snapshot)
    assert b"class_version" not in stored.state and b'"award_ids"' in stored.state
    assert app.snapshots is not None
    app.snapshots.recorder.insert_events([stored])

    cold = opened(apps, members_app(settings, 0))
    assert cold.repository.get(member_id) == whole
    check_v1_account(cold, expected)
    drop_events_upto(settings, member_id, expected["version"])  # the snapshot alone
    assert opened(apps, members_app(settings, 0)).repository.get(member_id) == whole


def test_partial_refunds_of_a_version_1_account_and_a_version_4_snapshot(
    settings: Settings, apps: list[Members]
) -> None:
    """#32 item 6 on stored data: refunds stored by version 1 (``Refunded`` without a
    refund id, of whole orders) load as the order's refund without an id; a version-4
    state snapshot (no ``order_refunds``) loads through ``Member.upcast_v4_v5``; partial
    refunds of an old order go back, add up to the order and replay by their ids."""
    app = opened(apps, members_app(settings, 0))
    fixture, member_id = store_v1_stream(app)
    expected = fixture["expected"]
    before = from_events(app, member_id)
    assert before.order_refunds == {scoped_key(None, "o1"): {"": 30}}

    # the same account as a version-4 snapshot (refunds were whole orders then), alone
    v4 = {k: v for k, v in Member.Snapshot.take(before).state.items() if k != "order_refunds"}
    v4["class_version"] = 4
    snapshot = Member.Snapshot(  # type: ignore[call-arg]
        originator_id=member_id,
        originator_version=before.version,
        timestamp=datetime.now(UTC),
        topic="loyalty.domain.member:Member",
        state=v4,
    )
    stored = app.mapper.to_stored_event(snapshot)
    assert b'"order_refunds"' not in stored.state and b'"class_version":4' in stored.state
    assert app.snapshots is not None
    app.snapshots.recorder.insert_events([stored])  # at the stream's last version: loads use it
    app = opened(apps, members_app(settings, 0))
    loaded = app.repository.get(member_id)
    assert loaded == before and loaded.order_refunds == before.order_refunds
    # o1 was refunded in full by version 1: a replay; nothing left for a partial one
    assert loaded.refund("o1", "shop") == 30 and loaded.collect_events() == []
    spending = Spending(Accounts(app))
    with pytest.raises(RefundExceedsOrder):
        spending.refund("legacy-1", "o1", "shop", refund_id="r-1", amount=1)
    # o2 (20, unrefunded): partial refunds, each replayed by its id
    first = spending.refund("legacy-1", "o2", "shop", refund_id="r-1", amount=5)
    assert (first.amount, first.currency, first.refundable) == (5, expected["currency"] + 5, 15)
    second = spending.refund("legacy-1", "o2", "shop", refund_id="r-2", amount=10)
    assert (second.currency, second.refundable) == (expected["currency"] + 15, 5)
    spending.refund("legacy-1", "o2", "shop", refund_id="r-3", amount=1)
    assert spending.refund("legacy-1", "o2", "shop", refund_id="r-1", amount=5) == replace(
        first, replayed=True
    )
    with pytest.raises(RefundConflict):
        spending.refund("legacy-1", "o2", "shop", refund_id="r-2", amount=9)
    with pytest.raises(RefundExceedsOrder):
        spending.refund("legacy-1", "o2", "shop", refund_id="r-4", amount=5)
    rest = spending.refund("legacy-1", "o2", "shop")
    assert (rest.amount, rest.currency, rest.refundable) == (4, expected["currency"] + 20, 0)
    cold = opened(apps, members_app(settings, 0)).repository.get(member_id)
    assert cold.currency == expected["currency"] + 20
    assert cold.order_refunds[scoped_key(None, "o2")] == {"r-1": 5, "r-2": 10, "r-3": 1, "": 4}
    assert scoped_key(None, "o2") in cold.refunded_orders


commands_st = st.lists(
    st.one_of(
        st.tuples(
            st.just("award"),
            st.sampled_from(["w1.5.1", "w1.5.2", "w1.6.0", "w2.1.1", "seed", "w01.5.1"]),
            st.integers(0, 50),
        ),
        st.tuples(st.just("spend"), st.sampled_from(["o1", "o2", "o3"]), st.integers(1, 30)),
        st.tuples(st.just("refund"), st.sampled_from(["o1", "o2", "o3"]), st.just(0)),
        st.tuples(st.just("adjust"), st.sampled_from(["a1", "a2"]), st.integers(-20, 20)),
        st.tuples(st.just("snapshot"), st.just(""), st.just(0)),
    ),
    max_size=40,
)


def run_command(member: Member, kind: str, key: str, amount: int) -> object:
    try:
        if kind == "award":
            return member.award(key, amount, amount, 1, 1, RANKS)
        if kind == "spend":
            return member.spend(key, amount)
        if kind == "refund":
            return member.refund(key)
        return member.adjust(key, amount, abs(amount), "r", RANKS)
    except DomainError as exc:
        return type(exc).__name__


@examples(max_examples=150, deadline=None)
@given(commands=commands_st)
def test_commands_answer_the_same_after_any_snapshot_round_trip(
    commands: list[tuple[str, str, int]],
) -> None:
    """A member that goes through snapshots (state -> JSON -> state) at any points
    answers every command as one that never did, and ends in the same state."""
    app = Members(env={"PERSISTENCE_MODULE": "eventsourcing.popo"})
    plain, snapped = Member(user_id="p"), Member(user_id="p")
    for kind, key, amount in commands:
        if kind == "snapshot":
            snapped.collect_events()
            stored = app.mapper.to_stored_event(Member.Snapshot.take(snapped))
            snapped = app.mapper.to_domain_event(stored).mutate(None)  # type: ignore[attr-defined]
            continue
        assert run_command(snapped, kind, key, amount) == run_command(plain, kind, key, amount)
    # the version is how many events were stored: collecting a new account's first
    # events as one Enrolled (issue 30) depends on when they were collected
    skip = TIMES | {"_version"}
    assert {k: v for k, v in vars(snapped).items() if k not in skip} == {
        k: v for k, v in vars(plain).items() if k not in skip
    }
