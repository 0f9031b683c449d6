"""Pending earnings (issue 16): exact across windows, one recording per interval, at once
on a rank change or a new account, spendable at once, atomic with the pending row, and
erased by forget-me. Real SQLite and PostgreSQL."""

from __future__ import annotations

import copy
import random
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import orjson
import pytest
import sqlalchemy as sa
from eventsourcing.application import AggregateNotFoundError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loyalty.adapters.db import Database
from loyalty.adapters.event_store import event_store_env
from loyalty.adapters.ingress_log import create_ingress_log
from loyalty.adapters.pending_store import PendingTable
from loyalty.adapters.pipeline_store import PipelineStore
from loyalty.adapters.rules_store import RulesStore
from loyalty.application.accounts import Accounts, Members, Spending
from loyalty.application.ingress import IncomingEvent, IngestService, shard_of
from loyalty.application.pending import PendingMoved
from loyalty.application.pipeline import Pipeline
from loyalty.config import Settings
from loyalty.domain.errors import InsufficientFunds, MemberNotFound
from loyalty.domain.member import Member
from loyalty.domain.rules import (
    DEFAULT_RULES_WIRE,
    Activity,
    CapCounter,
    aggregate,
    parse_rule_set,
)
from tests.conftest import drain_with

NOW = datetime.now(UTC).replace(microsecond=0)
RULES = parse_rule_set(copy.deepcopy(DEFAULT_RULES_WIRE), 1)
LADDER = RULES.ranks


@pytest.fixture
def members(settings: Settings) -> Iterator[Members]:
    app = Members(env=event_store_env(settings))
    yield app
    app.close()


def make_pipeline(db: Database, members: Members, chunk: int = 1000) -> Pipeline:
    return Pipeline(
        create_ingress_log(db),
        PipelineStore(db),
        RulesStore(db, cache_seconds=0),
        Accounts(members, pending=PendingTable(db)),
        chunk=chunk,
        interval_seconds=3600,
    )


_ingested = [0]


def ingest(db: Database, events: list[IncomingEvent]) -> None:
    service = IngestService(
        create_ingress_log(db),
        clock=lambda: NOW + timedelta(minutes=1),
        retention=timedelta(days=7),
        future_skew=timedelta(minutes=5),
        shard_count=db.settings.shard_count,
    )
    for i in range(0, len(events), 500):
        service.ingest("src", events[i : i + 500])


def ev(i: int, user: str, type_: str, attrs: str = "{}", hours: int = 0) -> IncomingEvent:
    return IncomingEvent(f"e{i}", user, type_, NOW - timedelta(hours=hours), attrs)


def premium(i: int, user: str) -> IncomingEvent:
    """15 currency, 7.5 rank points: half a point lost by every window that floors it."""
    return ev(i, user, "made_purchase", '{"tier": "premium"}')


def exact(events: list[IncomingEvent]) -> dict[str, tuple[int, int]]:
    """floor of each member's exact total, all events weighed at once."""
    result = aggregate(
        (
            Activity(e.user_id, e.type, e.occurred_at, orjson.loads(e.attributes_json))
            for e in events
        ),
        RULES,
        CapCounter(),
    )
    return {u: (d.currency, d.rank_points) for u, d in result.drafts.items() if d.rank_points}


def account(members: Members, user: str) -> Member:
    member: Member = members.repository.get(Member.create_id(user))
    return member


def stream(members: Members, user: str) -> list[str]:
    return [type(e).__name__ for e in members.events.get(Member.create_id(user))]


def mixed_events(n: int, users: int, seed: int) -> list[IncomingEvent]:
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        user = f"m{rnd.randrange(users)}"
        kind = rnd.choice(["premium", "premium", "played_game", "logged_on"])
        out.append(premium(i, user) if kind == "premium" else ev(i, user, kind, hours=i % 40))
    return out


@pytest.mark.slow  # in-process but long: left out of make test-fast
def test_the_same_events_in_any_windows_give_the_floor_of_the_exact_total(
    db: Database, members: Members
) -> None:
    """Windows of 1 event each (every premium purchase in its own window) and one big
    window give the same credited totals: floor(exact sum). Per-window rounding would
    lose half a point per premium window."""
    events = mixed_events(160, 5, seed=4)
    ingest(db, events)
    small = make_pipeline(db, members, chunk=1)
    drain_with(small, db)
    want = exact(events)
    assert {u: (account(members, u).currency, account(members, u).rank_points) for u in want} == (
        want
    )
    assert PendingTable(db).count() == 0


def test_one_recording_per_interval_whatever_the_traffic(db: Database, members: Members) -> None:
    """A first contribution creates the account at once; later windows only grow the
    pending row (no account event) until the interval is over; then one award records
    it all."""
    ingest(db, [ev(0, "ann", "logged_on")])
    pipeline = make_pipeline(db, members, chunk=1)
    drain_with(pipeline, db, record=False)
    assert stream(members, "ann") == ["Created", "Awarded", "RankChanged"]
    events = [premium(i, "ann") for i in range(1, 41)]
    ingest(db, events)
    drain_with(pipeline, db, record=False)  # 40 windows of one event
    assert stream(members, "ann") == ["Created", "Awarded", "RankChanged"]  # no new event
    row = PendingTable(db).load(["ann"])["ann"]
    assert (row.currency, row.rank_points, row.event_count) == (Decimal(600), Decimal(300), 40)
    shard = shard_of("ann", db.settings.shard_count)
    assert pipeline.record_due([shard]) == 0  # the interval is not over
    later = datetime.now(UTC) + timedelta(seconds=3601)
    assert pipeline.record_due([shard], now=later) == 1
    assert stream(members, "ann")[-1] == "Awarded"
    assert len(stream(members, "ann")) == 4
    ann = account(members, "ann")
    assert (ann.currency, ann.rank_points) == (601, 301)
    assert PendingTable(db).load(["ann"]) == {}  # the row is gone once recorded


def test_a_rank_change_is_recorded_at_once(db: Database, members: Members) -> None:
    ingest(db, [ev(0, "bo", "logged_on")])
    pipeline = make_pipeline(db, members, chunk=1)
    drain_with(pipeline, db, record=False)
    ingest(db, [premium(i, "bo") for i in range(1, 11)])  # 75 points: still bronze
    drain_with(pipeline, db, record=False)
    assert len(stream(members, "bo")) == 3
    # 50 points each: the 19th lifts bo to silver (1 + 75 + 950 >= 1000); 2 more follow
    ingest(db, [ev(100 + i, "bo", "joined_competition", hours=24 * (i // 5)) for i in range(21)])
    drain_with(pipeline, db, record=False)
    kinds = stream(members, "bo")
    assert kinds[3:] == ["Awarded", "RankChanged"], kinds
    assert account(members, "bo").rank == "silver"
    # after it, the rest waits for the interval again
    assert len(PendingTable(db).load(["bo"])) == 1


def test_a_spend_uses_pending_currency_in_one_save(db: Database, members: Members) -> None:
    ingest(db, [ev(0, "cy", "logged_on")])
    pipeline = make_pipeline(db, members)
    drain_with(pipeline, db, record=False)
    ingest(db, [premium(i, "cy") for i in range(1, 4)])  # 45 currency pending
    drain_with(pipeline, db, record=False)
    accounts = Accounts(members, pending=PendingTable(db))
    spending = Spending(accounts, ranks=lambda: LADDER)
    assert account(members, "cy").currency == 1
    with pytest.raises(InsufficientFunds):
        spending.spend("cy", "o-big", 47)
    assert len(stream(members, "cy")) == 3  # a refused spend records nothing
    result = spending.spend("cy", "o1", 46)
    assert result.currency == 0
    assert stream(members, "cy")[3:] == ["Awarded", "Spent"]
    assert PendingTable(db).load(["cy"]) == {}
    assert spending.spend("cy", "o1", 46).currency == 0  # a replay


def test_a_recording_of_a_row_changed_since_it_was_read_saves_nothing(
    db: Database, members: Members
) -> None:
    """The revision check runs in the event insert's transaction: a window committed
    between the read and the save fails the save (events rolled back, row kept)."""
    ingest(db, [ev(0, "di", "logged_on")])
    pipeline = make_pipeline(db, members)
    drain_with(pipeline, db, record=False)
    ingest(db, [premium(1, "di")])
    drain_with(pipeline, db, record=False)
    table = PendingTable(db)
    stale = table.load(["di"])["di"]
    ingest(db, [premium(2, "di")])
    drain_with(pipeline, db, record=False)  # the row grows: a new revision
    accounts = Accounts(members, pending=table)
    member = account(members, "di")
    assert accounts.fold(member, stale, LADDER)
    with pytest.raises(PendingMoved):
        accounts.save(member, fence=None, consumed=[stale])
    assert len(stream(members, "di")) == 3  # nothing saved
    fresh = table.load(["di"])["di"]
    assert fresh.currency == Decimal(30)  # both windows still pending, once each
    assert accounts.record_pending(["di"], LADDER) == 1
    assert account(members, "di").currency == 31


def test_get_member_and_leaderboard_include_pending(
    settings: Settings, db: Database, members: Members
) -> None:
    from fastapi.testclient import TestClient

    from loyalty.adapters.keys import KeyStore, Role
    from loyalty.api.app import create_app
    from loyalty.worker import build_projection

    ingest(db, [ev(0, "ed", "logged_on")])
    pipeline = make_pipeline(db, members)
    drain_with(pipeline, db, record=False)
    ingest(db, [premium(i, "ed") for i in range(1, 4)])  # 45 currency, 22.5 points
    drain_with(pipeline, db, record=False)
    build_projection(db).catch_up()
    shop = {"Authorization": f"Bearer {KeyStore(db).create(Role('shop'), 'shop')}"}
    with TestClient(create_app(settings, db=db)) as client:
        body = client.get("/v1/members/ed", headers=shop).json()
        assert body["currency"] == 46 and body["pending_currency"] == 45
        assert body["rank_points"] == 23 and body["pending_rank_points"] == 22
        board = client.get("/v1/leaderboard", headers=shop).json()["entries"]
        assert [(e["user_id"], e["rank_points"]) for e in board] == [("ed", 23)]


def test_forget_erases_the_pending_row(settings: Settings, members: Members) -> None:
    """A member forgotten while earnings are pending: the row goes with the rest (and
    nothing of the member is left in the pending table)."""
    from loyalty.worker import build_forget_service

    fast = settings.model_copy(
        update={"forget_settle_seconds": 0.0, "marker_refresh_seconds": 0.01}
    )
    db = Database(fast)
    try:
        canary = "canary-pending"
        ingest(db, [ev(0, canary, "logged_on"), ev(1, "bystander", "logged_on")])
        pipeline = make_pipeline(db, members)
        drain_with(pipeline, db, record=False)
        ingest(db, [premium(2, canary), premium(3, "bystander")])
        drain_with(pipeline, db, record=False)
        assert _pending_rows(db, canary) and _pending_rows(db, "bystander")
        service = build_forget_service(db)
        request = service.request(canary)
        assert service.run_pending() == 1
        done = service.status(request.request_id)
        assert done is not None and done.erased["pipeline_pending"] == 1
        assert _pending_rows(db, canary) == []
        assert _pending_rows(db, "bystander")  # the others keep theirs
    finally:
        db.dispose()


def _pending_rows(db: Database, user: str) -> list[Any]:
    with db.read() as conn:
        return conn.execute(
            sa.text("SELECT * FROM pipeline_pending WHERE user_id = :u"), {"u": user}
        ).all()


# ------------------------------------------------------------------ property test

_example = [0]
USERS = 3
step = st.one_of(
    st.tuples(
        st.just("events"),
        st.integers(0, USERS - 1),
        st.sampled_from(["premium", "played_game", "logged_on", "joined_competition"]),
        st.integers(1, 6),
    ),
    st.tuples(st.just("window"), st.integers(1, 5)),
    st.tuples(st.just("expire")),
    st.tuples(st.just("spend"), st.integers(0, USERS - 1), st.integers(1, 60)),
    st.tuples(st.just("restart")),
)


@pytest.mark.slow  # in-process but long: left out of make test-fast
@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(steps=st.lists(step, min_size=1, max_size=25))
def test_any_interleaving_keeps_recorded_plus_pending_exact(
    db: Database, settings: Settings, steps: list[tuple[Any, ...]]
) -> None:
    """Windows of any size, interval expiries, spends of pending currency and restarts in
    any order: recorded + pending (+ spent) = floor(exact total) for every member, and
    every award is a new account, an interval expiry, a command or a rank change."""
    _example[0] += 1
    prefix = f"x{_example[0]}-"
    users = [f"{prefix}{i}" for i in range(USERS)]
    shards = range(db.settings.shard_count)
    app = Members(env=event_store_env(settings))
    apps = [app]
    pipeline = make_pipeline(db, app)
    spending = Spending(Accounts(app, pending=PendingTable(db)), ranks=lambda: LADDER)
    events: list[IncomingEvent] = []
    spent = dict.fromkeys(users, 0)
    forced = dict.fromkeys(users, 1)  # the first contribution creates the account
    try:
        for op in steps:
            if op[0] == "events":
                _, u, kind, n = op
                base = len(events)
                new = [
                    premium(0, users[u]) if kind == "premium" else ev(0, users[u], kind)
                    for _ in range(n)
                ]
                new = [
                    IncomingEvent(
                        f"{prefix}{base + i}", e.user_id, e.type, e.occurred_at, e.attributes_json
                    )
                    for i, e in enumerate(new)
                ]
                events += new
                ingest(db, new)
            elif op[0] == "window":
                pipeline.chunk = op[1]
                for shard in shards:
                    pipeline.process_shard(shard)
            elif op[0] == "expire":
                pipeline.record_all(shards)
                for u in users:
                    forced[u] += 1
            elif op[0] == "spend":
                _, u, amount = op
                forced[users[u]] += 1
                try:
                    spending.spend(users[u], f"o{len(events)}-{amount}", amount)
                    spent[users[u]] += amount
                except (InsufficientFunds, MemberNotFound):
                    pass
            else:  # restart: new processes, nothing in memory survives
                app = Members(env=event_store_env(settings))
                apps.append(app)
                pipeline = make_pipeline(db, app)
                spending = Spending(Accounts(app, pending=PendingTable(db)), ranks=lambda: LADDER)
        pipeline.chunk = 1  # the rest in windows of one event: every fraction counts
        drain_with(pipeline, db, record=False)
        want = exact(events)
        table = PendingTable(db)
        rows = table.load(users)
        for user in users:
            target = want.get(user, (0, 0))
            try:
                member = account(app, user)
            except AggregateNotFoundError:
                assert target == (0, 0) and user not in rows
                continue
            row = rows.get(user)
            extra = (0, 0) if row is None else member.with_pending(row.currency, row.rank_points)
            assert (member.currency + extra[0] + spent[user], member.rank_points + extra[1]) == (
                target
            )
            kinds = stream(app, user)
            assert kinds.count("Awarded") <= forced[user] + kinds.count("RankChanged")
        pipeline.record_all(shards)
        for user in want:
            member = account(app, user)
            assert (member.currency + spent[user], member.rank_points) == want[user]
        assert table.load(users) == {}
    finally:
        for a in apps:
            a.close()


def test_a_window_of_a_member_being_erased_commits_nothing(db: Database, members: Members) -> None:
    """The commit refuses contributions of a member whose erasure is under way (as the
    event insert does): the checkpoint does not move, no pending row appears."""
    from loyalty.domain.errors import MemberBeingErased

    ingest(db, [ev(0, "gus", "logged_on"), premium(1, "gus")])
    with db.write() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO forget_markers (subject_hash, member_id, requested_at, state, "
                "expires_at, seq) VALUES ('h', :m, :t, 'erasing', :e, 1)"
            ),
            {
                "m": str(Member.create_id("gus")),
                "t": NOW - timedelta(days=3),  # older than the events: they are not filtered
                "e": NOW + timedelta(days=7),
            },
        )
    pipeline = make_pipeline(db, members)
    shard = shard_of("gus", db.settings.shard_count)
    before = PipelineStore(db).load(shard).position
    with pytest.raises(MemberBeingErased):
        pipeline.process_shard(shard)
    assert PipelineStore(db).load(shard).position == before
    assert _pending_rows(db, "gus") == []
