"""Pending earnings (issue 16): exact across windows, one recording per interval, at once
on a rank change or a new account, spendable at once, atomic with the pending row, and
erased by forget-me. Real SQLite and PostgreSQL."""

from __future__ import annotations

import copy
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any
from uuid import UUID

import orjson
import pytest
import sqlalchemy as sa
from eventsourcing.application import AggregateNotFoundError, LRUCache
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from loyalty.adapters.db import Database
from loyalty.adapters.event_store import event_store_env, stream_loader, worker_env
from loyalty.adapters.ingress_log import create_ingress_log
from loyalty.adapters.pending_store import PendingTable
from loyalty.adapters.pipeline_store import PipelineStore
from loyalty.adapters.rules_store import RulesStore
from loyalty.application.accounts import Accounts, Members, Spending
from loyalty.application.commands.rules import parse_rule_set
from loyalty.application.ingress import IncomingEvent, IngestService, shard_of
from loyalty.application.pending import PendingMoved
from loyalty.application.pipeline import Pipeline
from loyalty.config import Settings
from loyalty.domain.errors import InsufficientFunds, MemberNotFound
from loyalty.domain.member import Member, account_events
from loyalty.domain.rules import DEFAULT_RULES_WIRE, Activity, CapCounter, aggregate
from tests.conftest import drain_with, wait_visible

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
    wait_visible(db)


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


def stored(members: Members, user: str) -> list[str]:
    """The member's stored events."""
    return [type(e).__name__ for e in members.events.get(Member.create_id(user))]


def stream(members: Members, user: str) -> list[str]:
    """The member's account events as every reader reads them (an ``Enrolled``: its
    ``Created``, ``Awarded`` and ``RankChanged``)."""
    return [
        type(e).__name__
        for stored_event in members.events.get(Member.create_id(user))
        for e in account_events(stored_event)
    ]


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
    # one stored event opens the account (issue 30): Created + Awarded + RankChanged
    assert stored(members, "ann") == ["Enrolled"]
    assert stream(members, "ann") == ["Created", "Awarded", "RankChanged"]
    events = [premium(i, "ann") for i in range(1, 41)]
    ingest(db, events)
    drain_with(pipeline, db, record=False)  # 40 windows of one event
    assert stored(members, "ann") == ["Enrolled"]  # no new event
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


def test_settling_more_members_than_the_cache_holds_reads_each_stream_in_bulk(
    settings: Settings, db: Database
) -> None:
    """A window's new pending rows of more members than the aggregate cache holds (one
    shard's window: 50 members, a cache of 10): the settling reads their accounts with
    the bulk loader, slice by slice, and none one stream at a time (all prefetched at
    once, 40 of 50 were evicted before they were read, then read again singly: 300k
    single reads at 400k members)."""
    shards = db.settings.shard_count
    users = [u for u in (f"many-{i}" for i in range(5000)) if shard_of(u, shards) == 0][:50]
    app = Members(env={**worker_env(settings), "AGGREGATE_CACHE_MAXSIZE": "10"})
    try:
        accounts = Accounts(
            app, stream_loader=lambda a: stream_loader(a.recorder), pending=PendingTable(db)
        )
        pipeline = Pipeline(
            create_ingress_log(db),
            PipelineStore(db),
            RulesStore(db, cache_seconds=0),
            accounts,
            chunk=1000,
            interval_seconds=3600,
        )
        ingest(db, [ev(i, user, "logged_on") for i, user in enumerate(users)])
        drain_with(pipeline, db, record=False)  # the accounts, created at once
        app.repository.cache = LRUCache(10)  # what another process's traffic left there
        single: list[UUID] = []
        select = app.recorder.select_events
        app.recorder.select_events = (  # type: ignore[method-assign]
            lambda originator_id, **kw: single.append(originator_id) or select(originator_id, **kw)
        )
        ingest(db, [premium(100 + i, user) for i, user in enumerate(users)])
        drain_with(pipeline, db, record=False)
        assert len(PendingTable(db).load(users)) == 50  # settled: each row waits for the interval
        assert single == []
    finally:
        app.close()


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

    from loyalty.adapters.keys import KeyStore
    from loyalty.api.app import create_app
    from loyalty.application.access import Role
    from loyalty.bootstrap import build_projection

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
    from loyalty.bootstrap import build_forget_service

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


# --------------------------------- property test: rules changes and requalification

RANKED_USERS = 3
PRICES: dict[str, tuple[dict[str, tuple[Decimal, Decimal]], tuple[int, int]]] = {
    # version name: ({kind: (currency, rank points) per event}, (silver, gold))
    "a": (
        {
            "buy": (Decimal(10), Decimal(5)),
            "premium": (Decimal(15), Decimal("7.5")),
            "game": (Decimal(5), Decimal(10)),
            "competition": (Decimal(20), Decimal(50)),
        },
        (100, 400),
    ),
    "b": (
        {
            "buy": (Decimal(20), Decimal(10)),
            "premium": (Decimal(30), Decimal(15)),
            "game": (Decimal("2.5"), Decimal("12.5")),
            "competition": (Decimal(20), Decimal(50)),
        },
        (60, 250),
    ),
}
RANK_NAMES = ("bronze", "silver", "gold")
KIND_EVENT = {
    "buy": ("made_purchase", "{}"),
    "premium": ("made_purchase", '{"tier": "premium"}'),
    "game": ("played_game", "{}"),
    "competition": ("joined_competition", "{}"),
}


def ranked_wire(name: str) -> dict[str, Any]:
    """A rule set of the model: no caps (every event contributes), rolling 30 days,
    currency expiring at the end of the month earned."""
    prices, (silver, gold) = PRICES[name]
    buy, premium_price = prices["buy"], prices["premium"]
    factor = premium_price[0] / buy[0]
    assert premium_price[1] / buy[1] == factor
    return {
        "rules": [
            {
                "event_type": "made_purchase",
                "currency": str(buy[0]),
                "rank_points": str(buy[1]),
                "multipliers": [{"when": {"tier": "premium"}, "factor": str(factor)}],
            },
            {
                "event_type": "played_game",
                "currency": str(prices["game"][0]),
                "rank_points": str(prices["game"][1]),
            },
            {
                "event_type": "joined_competition",
                "currency": str(prices["competition"][0]),
                "rank_points": str(prices["competition"][1]),
            },
        ],
        "ranks": [
            {"name": "bronze", "min_rank_points": 0, "privileges": []},
            {"name": "silver", "min_rank_points": silver, "privileges": []},
            {"name": "gold", "min_rank_points": gold, "privileges": []},
        ],
        "rank_qualification": {"period": {"rolling_days": 30}},
        # the month of the events (NOW) expires at the start of the next one
        "currency_expiry": {"after_months": 0, "effective_from": "2020-01"},
    }


def model_rank(name: str, points: Decimal) -> str:
    """The rank the model's ladder ``name`` gives whole ``points`` (independent of
    ``RankLadder``)."""
    silver, gold = PRICES[name][1]
    whole = int(points // 1)
    return "gold" if whole >= gold else "silver" if whole >= silver else "bronze"


def higher(a: str | None, b: str) -> str:
    return b if a is None or RANK_NAMES.index(b) > RANK_NAMES.index(a) else a


@dataclass
class Held:
    """What the model says a member holds."""

    account: bool = False
    rank: str | None = None
    points: Decimal = Decimal(0)
    """Exact rank points of every processed event (all earned today: one period)."""
    currency: Decimal = Decimal(0)
    """Exact currency of every processed event: the month's lot gets its whole units."""
    spent: int = 0
    row: bool | None = False
    """A pending row is left (not recorded at once); None: not known yet."""
    unprocessed: list[str] = field(default_factory=list)
    processed: list[str] = field(default_factory=list)
    """The kinds of the processed events (a compensation weighs them again)."""
    indexed: bool = False
    """Credited since the expiry job last read the member (the job reads it)."""
    closed: bool = False
    """The job expired currency of the month: all of it, and all earned in it later."""
    month_taken: int = 0
    """Whole currency taken from the month's lot (spends, compensation deductions)."""
    legacy: int = 0
    """The legacy lot: a compensation's credit goes there (``Member.adjust`` without a
    month), it never expires (no ``retroactive`` expiry) and, sorting before every
    month, is taken first by a spend or a deduction."""
    adjusted: tuple[int, int] = (0, 0)
    """Net (currency, rank points) the compensations applied (after the clamp)."""

    @property
    def month_left(self) -> int:
        return 0 if self.closed else int(self.currency // 1) - self.month_taken

    @property
    def spendable(self) -> int:
        return self.legacy + self.month_left

    def take(self, amount: int) -> None:
        """A debit (spend or deduction) of ``amount`` <= spendable: oldest lot first."""
        from_legacy = min(self.legacy, amount)
        self.legacy -= from_legacy
        self.month_taken += amount - from_legacy

    def recorded(self, version: str) -> None:
        """A recording of the pending row (if any): it lifts the rank, credits the
        month."""
        if self.row:
            self.rank, self.row = higher(self.rank, model_rank(version, self.points)), False
            self.indexed = True


def model_compensation(old: str | None, new: str, kinds: list[str]) -> tuple[int, int]:
    """What a compensation from ``old`` to ``new`` asks for a member whose events of the
    period weighed under ``old`` are ``kinds``: floor(new exact sum) - floor(old exact
    sum), currency and rank points apart (independent of ``DryRun``)."""
    if old is None or not kinds:
        return 0, 0
    sums = [
        [sum((PRICES[name][0][k][i] for k in kinds), Decimal(0)) for i in (0, 1)]
        for name in (old, new)
    ]
    return (
        int(sums[1][0] // 1) - int(sums[0][0] // 1),
        int(sums[1][1] // 1) - int(sums[0][1] // 1),
    )


ranked_step = st.one_of(
    st.tuples(
        st.just("events"),
        st.integers(0, RANKED_USERS - 1),
        st.sampled_from(sorted(KIND_EVENT)),
        st.integers(1, 6),
    ),
    st.tuples(st.just("drain")),
    st.tuples(st.just("interval")),
    st.tuples(st.just("spend"), st.integers(0, RANKED_USERS - 1), st.integers(1, 80)),
    st.tuples(st.just("rules"), st.sampled_from(["a", "b"])),
    st.tuples(st.just("requalify"), st.sampled_from([0, 40])),
    st.tuples(st.just("restart")),
    # `rules apply --compensate` to version "a" or "b" (the same as the current one: the
    # compensation of a version stored by a plain `rules` step, or a re-run)
    st.tuples(st.just("compensate"), st.sampled_from(["a", "b"])),
)


@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(steps=st.lists(ranked_step, min_size=1, max_size=20))
# issue 25 item 5: 150 points -> silver; the period rolls on -> bronze; 100 more lift
@example(
    steps=[
        ("events", 0, "competition", 3),
        ("drain",),
        ("requalify", 40),
        ("events", 0, "competition", 2),
        ("drain",),
    ]
)
# issue 25 item 6: the month expired; late events of it are neither shown nor spent
@example(
    steps=[
        ("events", 2, "buy", 1),
        ("drain",),
        ("requalify", 40),
        ("events", 2, "premium", 2),
        ("drain",),
        ("spend", 2, 10),
    ]
)
# a need noted under ladder "a" (silver at 100), then ladder "b" (silver at 60)
@example(
    steps=[
        ("events", 1, "buy", 1),
        ("drain",),
        ("events", 1, "game", 6),
        ("drain",),
        ("rules", "b"),
        ("events", 1, "buy", 1),
        ("drain",),
    ]
)
# issue 25 item 1, the stalled worker: 3 purchases weighed under "a" (10 each), 3 more
# received but not processed when "b" (purchases doubled) is applied with compensation:
# +30 for the 3 weighed under "a", and the 3 others are weighed under "b" by the
# pipeline (60) and not compensated again: 120 each, what 6 purchases give under "b"
@example(
    steps=[
        ("events", 0, "buy", 3),
        ("events", 1, "buy", 3),
        ("events", 2, "buy", 3),
        ("drain",),
        ("events", 0, "buy", 3),
        ("events", 1, "buy", 3),
        ("events", 2, "buy", 3),
        ("compensate", "b"),
        ("drain",),
        ("interval",),
    ]
)
# a compensation's rank points count in no qualification period (``Member.adjust``
# without a day): 2 purchases and 4 games give 40 currency and 50 period points under
# "a"; the compensation to "b" adds 10 and 20 (70 lifetime points, silver's threshold
# under "b" is 60) and leaves the member bronze, today and after a requalification as
# of today. Its credit goes to the legacy lot: a spend takes it first, what is left of
# it outlives the month's expiry, and the deduction back to "a" (-10) stops at it (5)
@example(
    steps=[
        ("events", 0, "buy", 2),
        ("drain",),
        ("events", 0, "game", 4),
        ("drain",),
        ("compensate", "b"),
        ("requalify", 0),
        ("spend", 0, 5),
        ("requalify", 40),
        ("compensate", "a"),
    ]
)
# a plain rules change, events weighed under it, then its compensation: only the
# events processed before it was stored are compensated (the later ones were weighed
# under it already); a second compensation to the same version is a no-op
@example(
    steps=[
        ("events", 1, "premium", 2),
        ("drain",),
        ("rules", "b"),
        ("events", 1, "premium", 2),
        ("drain",),
        ("compensate", "b"),
        ("compensate", "b"),
    ]
)
def test_rules_changes_and_requalification_keep_every_member_as_the_model_says(
    db: Database, settings: Settings, steps: list[tuple[Any, ...]]
) -> None:
    """Events, drains, interval recordings, spends, rules versions (other weights and
    ladder) and requalification runs (``Expiry.run`` as of today, or after the rolling
    30-day period: downgrades) in any order. After every step each member holds what an
    independent model says: the recorded rank (lifted at once when the pending points
    of the period reach a rank above the held one under the current ladder), whether a
    pending row is left, the balance, and a spendable amount the member view shows and a
    spend accepts (one more is refused).

    Compensation (``rules apply --compensate``, ``Compensation.apply``) as a step: the
    model re-weighs every event processed before the new version was stored (in the
    period: today) under the previous stored version and the new one and adjusts each
    member by floor(new sum) - floor(old sum), currency and rank points apart; a
    deduction is clamped to what the member holds once its pending row is recorded;
    events unprocessed at apply time are weighed under the new version by the pipeline
    and not compensated. As documented (``loyalty.application.compensation``), a
    compensation for V corrects from V-1 to V only: events weighed under an older
    version (a plain ``rules`` step between two compensations) keep that difference,
    and so does the model. A second apply of the same rules is a no-op."""
    from loyalty.adapters.expiry_store import ExpiryLease, MemberLots
    from loyalty.application.expiry import Expiry
    from loyalty.bootstrap import build_compensation, build_projection

    _example[0] += 1
    prefix = f"r{_example[0]}-"
    users = [f"{prefix}{i}" for i in range(RANKED_USERS)]
    rules = RulesStore(db, cache_seconds=0)
    version = "a"
    rules.put(ranked_wire(version))
    held = {u: Held() for u in users}
    # the current version: the one before it (None: stored before this example, no
    # event of it is weighed), each member's events processed before it was stored, and
    # whether its compensation ran
    previous: str | None = None
    before: dict[str, list[str]] = {u: [] for u in users}
    compensated = False
    apps: list[Members] = []

    def build() -> tuple[Members, Pipeline, Accounts, Spending, Expiry]:
        app = Members(env=event_store_env(settings))
        apps.append(app)
        accounts = Accounts(app, pending=PendingTable(db))
        return (
            app,
            make_pipeline(db, app),
            accounts,
            Spending(accounts, ranks=lambda: rules.current().ranks),
            Expiry(accounts, MemberLots(db), rules.current, ExpiryLease(db)),
        )

    app, pipeline, accounts, spending, expiry = build()
    counter = [0]
    try:
        for op in steps:
            if op[0] == "events":
                _, u, kind, n = op
                event_type, attrs = KIND_EVENT[kind]
                new = []
                for _ in range(n):
                    counter[0] += 1
                    new.append(
                        IncomingEvent(f"{prefix}{counter[0]}", users[u], event_type, NOW, attrs)
                    )
                ingest(db, new)
                held[users[u]].unprocessed += [kind] * n
            elif op[0] == "drain":
                drain_with(pipeline, db, record=False)
                for h in held.values():
                    if not h.unprocessed:
                        continue
                    prices = PRICES[version][0]
                    h.currency += sum(prices[k][0] for k in h.unprocessed)
                    h.points += sum(prices[k][1] for k in h.unprocessed)
                    h.processed += h.unprocessed
                    h.unprocessed = []
                    target = model_rank(version, h.points)
                    if not h.account or higher(h.rank, target) != h.rank:
                        # a new account or a lift is recorded at once; on PostgreSQL the
                        # reader's horizon (other sessions' transactions) may split the
                        # member's events over two windows, the second leaving a row:
                        # the rank is certain, the row is read
                        h.account, h.rank, h.row, h.indexed = True, target, None, True
                    else:
                        h.row = True
                split = PendingTable(db).load(held)
                for user, h in held.items():
                    if h.row is None:
                        h.row = user in split
            elif op[0] == "interval":
                pipeline.record_all(range(db.settings.shard_count))
                for h in held.values():
                    h.recorded(version)
            elif op[0] == "spend":
                _, u, amount = op
                h = held[users[u]]
                counter[0] += 1
                try:
                    spending.spend(users[u], f"o{counter[0]}", amount)
                except MemberNotFound:
                    assert not h.account
                except InsufficientFunds:
                    assert h.account and amount > h.spendable
                else:
                    h.recorded(version)
                    assert amount <= h.spendable
                    h.spent += amount
                    h.take(amount)
            elif op[0] == "rules":
                previous, before, compensated = version, snapshot(held), False
                version = op[1]
                rules.put(ranked_wire(version))
            elif op[0] == "compensate":
                target = op[1]
                if target != version:  # a new version and its run
                    previous, before, compensated = version, snapshot(held), False
                    version = target
                asked = {
                    u: (0, 0) if compensated else model_compensation(previous, version, before[u])
                    for u in users
                }
                wire = ranked_wire(target)
                since = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
                compensation = build_compensation(db, app)
                receipt = compensation.apply(wire, since=since, candidate=parse_rule_set(wire, 0))
                assert receipt["already_done"] == compensated, receipt
                compensated = True
                for user, (currency, points) in asked.items():
                    if not (currency or points):
                        continue  # no adjustment, the pending row is left
                    h = held[user]
                    h.recorded(version)  # the adjustment's save records the row first
                    currency = max(currency, -h.spendable)
                    points = max(points, -(int(h.points // 1) + h.adjusted[1]))
                    if currency >= 0:
                        h.legacy += currency
                    else:
                        h.take(-currency)
                    h.adjusted = (h.adjusted[0] + currency, h.adjusted[1] + points)
                # a second apply of the same rules: done already, nothing saved
                streams = {u: stream(app, u) if held[u].account else [] for u in users}
                again = compensation.apply(wire, since=since, candidate=parse_rule_set(wire, 0))
                assert again["already_done"] and again["new_version"] == receipt["new_version"]
                assert {u: stream(app, u) if held[u].account else [] for u in users} == streams
            elif op[0] == "requalify":
                # member_lots, member_ranks: whom the job reads
                build_projection(db, app).catch_up()
                report = expiry.run(datetime.now(UTC) + timedelta(days=op[1]))
                assert report.qualification and not report.interrupted
                for h in held.values():
                    if op[1] and h.indexed:  # the month is over: its currency expires
                        h.recorded(version)  # pending recorded first
                        h.closed = h.closed or h.month_left > 0  # the legacy lot stays
                        h.indexed = False
                for h in held.values():
                    if not h.account or h.rank == "bronze":  # the lowest rank is kept
                        continue
                    h.recorded(version)
                    h.rank = model_rank(version, h.points if op[1] == 0 else Decimal(0))
            else:  # restart: new processes, nothing in memory survives
                app.close()
                app, pipeline, accounts, spending, expiry = build()
            check_held(db, app, accounts, spending, rules, held, version)
    finally:
        for a in apps:
            a.close()


def snapshot(held: dict[str, Held]) -> dict[str, list[str]]:
    """Each member's events processed so far (before a version is stored)."""
    return {u: list(h.processed) for u, h in held.items()}


def check_held(
    db: Database,
    app: Members,
    accounts: Accounts,
    spending: Spending,
    rules: RulesStore,
    held: dict[str, Held],
    version: str,
) -> None:
    from types import SimpleNamespace

    from loyalty.api.routes.members import member_body
    from loyalty.application.accounts.views import MemberViews

    rows = PendingTable(db).load(held)
    # the part of the API's container the member view reads (the account view needs
    # neither the spending use case nor the statements)
    unused: Any = None
    views = MemberViews(accounts, unused, rules, unused, lambda: datetime.now(UTC))
    container: Any = SimpleNamespace(members=views)
    for user, h in held.items():
        try:
            member = account(app, user)
        except AggregateNotFoundError:
            assert not h.account and user not in rows, user
            continue
        assert h.account, user
        assert (member.rank, user in rows) == (h.rank, h.row), (user, h)
        view = member_body(container, member)  # what GET /v1/members/{id} shows
        assert view.currency == h.spendable, (user, h)
        if not h.closed:  # nothing expired: every unit earned or compensated is held or spent
            assert view.currency + h.spent == int(h.currency // 1) + h.adjusted[0]
        # compensated rank points count in the lifetime points, not in the period's
        assert view.rank_points == int(h.points // 1) + h.adjusted[1], (user, h)
        assert view.rank_points_this_period == int(h.points // 1), (user, h)
        assert view.rank == (higher(h.rank, model_rank(version, h.points)) if h.row else h.rank)
        with pytest.raises(InsufficientFunds):  # one more than shown is refused
            spending.spend(user, f"probe-{user}", h.spendable + 1)


def test_a_member_read_takes_its_pending_row_from_the_event_stores_connections(
    settings: Settings, db: Database, members: Members
) -> None:
    """PostgreSQL: the row is one statement on the event store's pool (in autocommit), not
    a checkout of the engine's (a ping, ``BEGIN``, the select, ``COMMIT``); the view
    still shows the pending part."""
    if db.backend != "postgresql":
        pytest.skip("SQLite reads the row through the engine: one file, no round trips")
    from loyalty.bootstrap import build_api_services

    ingest(db, [ev(0, "fa", "logged_on")])
    pipeline = make_pipeline(db, members)
    drain_with(pipeline, db, record=False)
    ingest(db, [premium(i, "fa") for i in range(1, 4)])  # 45 currency pending
    drain_with(pipeline, db, record=False)
    services = build_api_services(settings, db=db, members=members)
    assert services.members.view("fa").pending_currency == 45  # warm: rules, markers
    checkouts: list[object] = []
    listener = lambda *_args: checkouts.append(_args)  # noqa: E731
    sa.event.listen(db.engine, "checkout", listener)
    try:
        views = [services.members.view("fa") for _ in range(5)]
    finally:
        sa.event.remove(db.engine, "checkout", listener)
    assert [(v.currency, v.pending_currency) for v in views] == [(46, 45)] * 5
    assert checkouts == []


def test_a_commands_pending_read_is_one_statement_outside_a_transaction(
    db: Database, members: Members
) -> None:
    """PostgreSQL: a spend's read of the row (``Accounts.pending_of``) runs in autocommit
    on the engine's connection (no ``BEGIN``, no ``COMMIT``) and reads what is there."""
    if db.backend != "postgresql":
        pytest.skip("SQLite reads the row in a read transaction of the one file")
    ingest(db, [ev(0, "gu", "logged_on")])
    pipeline = make_pipeline(db, members)
    drain_with(pipeline, db, record=False)
    ingest(db, [premium(1, "gu")])  # 15 currency pending
    drain_with(pipeline, db, record=False)
    accounts = Accounts(members, pending=PendingTable(db))
    begun: list[object] = []
    listener = lambda *_args: begun.append(_args)  # noqa: E731
    sa.event.listen(db.engine, "begin", listener)
    try:
        row = accounts.pending_of("gu")
        missing = accounts.pending_of("nobody")
    finally:
        sa.event.remove(db.engine, "begin", listener)
    assert row is not None and row.currency == Decimal(15) and missing is None
    assert begun == []
