"""Which events a rules version applies to (issue 25, item 1), on real SQLite and
PostgreSQL: a window is weighed under the newest version stored when its end is noted,
whatever any process's rules cache holds; a window noted before a version was stored is
weighed under the older one even when it is re-read after a crash, and a compensation for
the new version counts it (and only it) as weighed under the older rules."""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from loyalty.adapters.db import Database
from loyalty.adapters.event_store import event_store_env
from loyalty.adapters.ingress_log import create_ingress_log
from loyalty.adapters.pending_store import PendingTable
from loyalty.adapters.pipeline_store import PipelineStore
from loyalty.adapters.rules_store import RulesStore
from loyalty.application.accounts import Accounts, Members
from loyalty.application.commands.rules import parse_rule_set
from loyalty.application.ingress import IncomingEvent, IngestService
from loyalty.application.pipeline import Pipeline
from loyalty.bootstrap import build_compensation, build_pipeline
from loyalty.config import Settings
from loyalty.domain.member import Member, account_events
from loyalty.domain.rules import DEFAULT_RULES_WIRE
from tests.conftest import drain_with, wait_visible

NOW = datetime.now(UTC).replace(microsecond=0)


class Crash(Exception):
    pass


@pytest.fixture
def members(settings: Settings) -> Iterator[Members]:
    app = Members(env=event_store_env(settings))
    yield app
    app.close()


def doubled() -> dict[str, Any]:
    wire = copy.deepcopy(DEFAULT_RULES_WIRE)
    wire["rules"][3]["currency"] = 20  # made_purchase: 10 -> 20
    wire["rules"][3]["rank_points"] = 10
    return wire


def ingest(db: Database, events: list[IncomingEvent]) -> None:
    IngestService(
        create_ingress_log(db),
        clock=lambda: datetime.now(UTC),
        retention=timedelta(days=7),
        future_skew=timedelta(minutes=5),
        shard_count=db.settings.shard_count,
    ).ingest("src", events)
    wait_visible(db)


def purchase(tag: str, user: str) -> IncomingEvent:
    return IncomingEvent(tag, user, "made_purchase", NOW - timedelta(minutes=5), "{}")


def test_events_after_a_plain_rules_change_are_weighed_under_it_whatever_the_cache(
    db: Database, members: Members
) -> None:
    """The production pipeline (rules cached 1 s) has just read version 1; another
    process stores version 2 (``PUT /v1/rules``); an event received right after is weighed
    under version 2 (today's code: under the cached version 1)."""
    pipeline = build_pipeline(db, members)
    ingest(db, [purchase("e1", "early")])
    drain_with(pipeline, db)  # reads (and caches) version 1
    RulesStore(db).put(doubled())  # another process
    ingest(db, [purchase("e2", "late")])
    drain_with(pipeline, db)  # within the cache's second
    for user, version, currency in (("early", 1, 10), ("late", 2, 20)):
        member: Member = members.repository.get(Member.create_id(user))
        awards = [
            e
            for stored in members.events.get(Member.create_id(user))
            for e in account_events(stored)  # a new member's award is in its Enrolled
            if type(e).__name__ == "Awarded"
        ]
        assert ([e.rule_version for e in awards], member.currency) == ([version], currency), user


def test_a_window_noted_before_a_version_is_weighed_under_the_older_one_and_compensated(
    db: Database, members: Members
) -> None:
    """A window is noted under version 1 and the worker dies; version 2 is applied with
    compensation; the window, re-read, is weighed under version 1 (noted with it) and the
    compensation counts it: 20 in all (today's code: re-read under version 2 and also
    compensated: 30)."""
    RulesStore(db).current()  # version 1 stored
    ingest(db, [purchase("e1", "alice")])

    def crash(step: str) -> None:
        if step == "window_noted":
            raise Crash(step)

    dying = Pipeline(
        create_ingress_log(db),
        PipelineStore(db),
        RulesStore(db),
        Accounts(members, pending=PendingTable(db)),
        chunk=1000,
        crash_hook=crash,
    )
    deadline = time.monotonic() + 30
    with pytest.raises(Crash):  # PostgreSQL: a pass may not see the row yet (the horizon)
        while time.monotonic() < deadline:
            dying.drain(range(db.settings.shard_count))
            time.sleep(0.05)
    receipt = build_compensation(db, members).apply(
        doubled(), NOW - timedelta(hours=1), parse_rule_set(doubled(), 0)
    )
    assert receipt["members_compensated"] == 1
    drain_with(build_pipeline(db, members), db)
    alice: Member = members.repository.get(Member.create_id("alice"))
    assert (alice.currency, alice.rank_points) == (20, 10)
    awards = [
        e for e in members.events.get(Member.create_id("alice")) if type(e).__name__ == "Awarded"
    ]
    assert [e.rule_version for e in awards] == [1]


def test_a_shard_idle_since_a_version_gets_its_start_fixed_at_its_position(
    db: Database, members: Members
) -> None:
    """A shard that has noted no window under version 2 gets the start fixed at its
    checkpoint position by the compensation; the pipeline's next window starts there and
    is weighed under version 2 (so it is not compensated)."""
    ingest(db, [purchase("e1", "bob")])
    drain_with(build_pipeline(db, members), db)
    store = PipelineStore(db)
    shards = range(db.settings.shard_count)
    positions = store.positions()
    RulesStore(db).put(doubled())
    starts = store.version_starts(2, shards)
    assert starts == {s: positions.get(s, (0, 0)) for s in shards}
    ingest(db, [purchase("e2", "bob")])
    drain_with(build_pipeline(db, members), db)
    assert store.version_starts(2, shards) == starts  # the pipeline kept them
    bob: Member = members.repository.get(Member.create_id("bob"))
    assert bob.currency == 10 + 20
