"""The expiry job's lease and its periodic run in the worker, on both backends."""

from __future__ import annotations

import copy
import threading
import time
from datetime import UTC, datetime

from loyalty.adapters.db import Database
from loyalty.adapters.event_store import event_store_env, worker_env
from loyalty.adapters.expiry_store import ExpiryLease, MemberLots
from loyalty.adapters.pending_store import PendingTable
from loyalty.adapters.rules_store import RulesStore
from loyalty.application.accounts import Accounts, Members, Spending
from loyalty.application.commands.rules import parse_rule_set
from loyalty.application.expiry import Expiry, ExpiryJob
from loyalty.bootstrap import build_expiry, build_projection, streaming_accounts
from loyalty.config import Settings
from loyalty.domain.member import Member
from loyalty.domain.rules import DEFAULT_RULES_WIRE
from loyalty.observability import Metrics

LADDER = parse_rule_set(copy.deepcopy(DEFAULT_RULES_WIRE), 1).ranks
AS_OF = datetime(2025, 1, 1, tzinfo=UTC)


def setup(settings: Settings, db: Database, members: int) -> None:
    wire = copy.deepcopy(DEFAULT_RULES_WIRE)
    wire["currency_expiry"] = {"after_months": 1, "effective_from": "2024-01"}
    RulesStore(db).put(wire)
    app = Members(env=event_store_env(settings))
    try:
        batch = []
        for i in range(members):
            member = Member(user_id=f"j{i}")
            member.award("a", 5, 0, 1, 1, LADDER, month="2024-02")
            batch.append(member)
        app.save(*batch)
        build_projection(db, app).catch_up()
    finally:
        app.close()


def test_a_second_run_while_one_holds_the_lease_is_skipped(
    settings: Settings, db: Database
) -> None:
    setup(settings, db, 3)
    with ExpiryLease(db).hold() as held:
        assert held is not None and held()
        report = build_expiry(db).run(AS_OF)
        assert report.skipped and report.lots == 0
    report = build_expiry(db).run(AS_OF)  # released: the next run does the work
    assert (report.skipped, report.lots, report.amount) == (False, 3, 15)


def test_the_worker_runs_expiry_on_its_clock_and_counts_it(
    settings: Settings, db: Database
) -> None:
    setup(settings, db, 4)
    metrics = Metrics()
    job = ExpiryJob(
        build_expiry(db, metrics=metrics),
        interval_seconds=0.2,
        clock=lambda: AS_OF,
        first_delay_seconds=0.0,
    )
    thread = threading.Thread(target=job.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while job.runs < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    job.stop()
    thread.join(timeout=10)
    assert job.runs >= 2 and job.failures == 0
    assert metrics.currency_expired_lots._value.get() == 4  # once, however many runs
    assert metrics.currency_expired_amount._value.get() == 20


def test_the_job_decides_on_the_store_not_on_its_cached_copies(
    settings: Settings, db: Database
) -> None:
    """A run caches an account whose due lot was spent; a refund elsewhere puts currency
    back into a later lot; the next run (same process) must see it."""
    wire = copy.deepcopy(DEFAULT_RULES_WIRE)
    wire["currency_expiry"] = {"after_months": 1, "effective_from": "2024-01"}
    RulesStore(db).put(wire)
    app = Members(env=event_store_env(settings))
    try:
        member = Member(user_id="kit")
        member.award("a1", 5, 0, 1, 1, LADDER, month="2024-01")
        member.award("a2", 10, 0, 1, 1, LADDER, month="2024-02")
        member.spend("o-1", 15)
        app.save(member)
        build_projection(db, app).catch_up()
        expiry = build_expiry(db)
        assert expiry.run(datetime(2024, 3, 15, tzinfo=UTC)).lots == 0  # January: spent
        rule = RulesStore(db).current().currency_expiry
        fresh = app.repository.get(member.id)
        fresh.refund("o-1", expiry=rule, as_of=datetime(2024, 3, 20, tzinfo=UTC))
        app.save(fresh)  # January's 5 expire at once, February's 10 are back
        assert expiry.run(datetime(2024, 4, 1, tzinfo=UTC)).amount == 10
        assert app.repository.get(member.id).currency == 0
    finally:
        app.close()


def test_a_run_takes_the_lots_it_expired_out_of_the_index(settings: Settings, db: Database) -> None:
    """The expiry index (``member_lots``) loses the rows a run expired, every one and no
    other (on PostgreSQL one statement for a page of rows): the next run reads none."""
    setup(settings, db, 5)
    index = MemberLots(db)
    index_rows = index.due("2024-12", None, 100)
    assert len(index_rows) == 5
    index.remove([])  # nothing to do
    index.remove(index_rows[:2] + [("2024-02", "nobody"), ("2024-03", 'j"0')])
    assert index.due("2024-12", None, 100) == index_rows[2:]
    report = build_expiry(db).run(AS_OF)
    assert (report.lots, report.amount) == (3, 15)  # the job reads the members by the index
    assert index.due("2024-12", None, 100) == []
    assert build_expiry(db).run(AS_OF).lots == 0


def test_a_spend_between_the_jobs_read_and_its_group_save_redoes_that_group(
    settings: Settings, db: Database
) -> None:
    """Expiry meets spend: the job saves 100 members a transaction. A spend of one of them
    committed between the job's read and its save fails the whole group's save (the
    stream version); the group is expired again one member at a time from fresh reads.
    Every lot expires exactly once, and the unit spent is not expired as well."""
    setup(settings, db, 150)  # j0..j149, 5 each in lot 2024-02, due at AS_OF
    app = Members(env=event_store_env(settings))
    members = Members(env=worker_env(settings))
    try:
        shop = Spending(Accounts(app, pending=PendingTable(db)))  # as the API spends
        accounts = streaming_accounts(db, members)
        expiry = Expiry(accounts, MemberLots(db), RulesStore(db).current, ExpiryLease(db))
        saves: list[int] = []
        group_save = accounts.save

        def save_after_a_spend(*changed: Member, **kw: object) -> None:
            saves.append(len(changed))
            if len(saves) == 1:  # j0 (first in the index's order) spends, and commits
                shop.spend("j0", "o-during", 1)
            group_save(*changed, **kw)  # type: ignore[arg-type]

        accounts.save = save_after_a_spend  # type: ignore[method-assign]
        report = expiry.run(AS_OF)
        assert saves[:2] == [100, 1]  # the group refused whole, then member by member
        assert (report.members, report.lots, report.amount) == (150, 150, 150 * 5 - 1)
        for i in range(150):
            member: Member = app.repository.get(Member.create_id(f"j{i}"))
            assert member.currency == 0 and member.lots == {}
            assert member.expired_lots == {"2024-02": 4 if i == 0 else 5}
            # created, (spent,) expired once: no second CurrencyExpired anywhere
            assert member.version == (3 if i == 0 else 2), f"j{i}"
        assert build_expiry(db).run(AS_OF).lots == 0
    finally:
        members.close()
        app.close()
