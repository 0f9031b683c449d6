"""A new member costs one stored account event (issue 30), on both backends.

The same first award lands once on a new account (``neo``: through the accounts, as the
pipeline records it: one ``Enrolled``) and once as a stream stored the way every version
before stored it (``old``: ``Created``, ``Awarded``, ``RankChanged`` written through the
library's recorder). Every reader gives the same answer for both: the account, the
statement (``GET /v1/members/{id}/history``), the feed (types, data), and the events the
rollups and the export read."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from eventsourcing.domain import Aggregate
from fastapi.testclient import TestClient

from loyalty.application.accounts import AwardCommand
from loyalty.application.projections import MemberProjection
from loyalty.application.reporting import MembersLog, account_event_rows, pseudonym
from loyalty.application.reporting.rollups import account_facts
from loyalty.domain.member import Member

Headers = dict[str, str]

SAME = ("w1.10.1", 50, 1200, 3, 1)  # award id, currency, rank points, events, rules


def container(client: TestClient) -> Any:
    return client.app.state.container  # type: ignore[attr-defined]


def stored_topics(c: Any, user_id: str) -> list[str]:
    rows = c.accounts.app.recorder.select_events(Member.create_id(user_id))
    return [r.topic.rsplit(".", 1)[1] for r in rows]


def store_old_shape(c: Any, user_id: str) -> None:
    """The stream the code before issue 30 stored for this award: three events."""
    ranks = c.rules.current().ranks
    member = Member(user_id=user_id)
    assert member.award(*SAME, ranks)
    events = Aggregate.collect_events(member)  # the aggregate's events, not compacted
    mapper = c.accounts.app.mapper
    c.accounts.app.recorder.insert_events([mapper.to_stored_event(e) for e in events])


def feed_of(client: TestClient, headers: Headers, user_id: str) -> list[dict[str, Any]]:
    page = client.get("/v1/feed", params={"limit": 1000}, headers=headers).json()
    return [e for e in page["events"] if e["user_id"] == user_id]


def test_a_new_member_is_one_stored_event_and_reads_as_the_three_it_was(
    client: TestClient, make_key: Callable[..., Headers]
) -> None:
    c = container(client)
    shop, feed = make_key("shop", "shop"), make_key("feed", "crm")
    ranks = c.rules.current().ranks
    assert c.accounts.award_many([AwardCommand("neo", *SAME)], ranks) == 1
    store_old_shape(c, "old")
    assert stored_topics(c, "neo") == ["Enrolled"]
    assert stored_topics(c, "old") == ["Created", "Awarded", "RankChanged"]

    # the account: a fresh load of each stream folds to the same state
    c.accounts.evict("neo")
    neo, old = c.accounts.get("neo"), c.accounts.get("old")
    skip = {"_id", "_version", "_created_on", "_modified_on", "_pending_events", "user_id"}
    assert {k: v for k, v in vars(neo).items() if k not in skip} == {
        k: v for k, v in vars(old).items() if k not in skip
    }
    assert (neo.currency, neo.rank_points, neo.rank) == (50, 1200, old.rank)
    assert neo.rank is not None and neo.version == 1
    # the cached copy is what the store holds: its next event is version 2
    assert c.accounts.award_many([AwardCommand("neo", "w1.11.1", 1, 1, 1, 1)], ranks) == 1
    c.accounts.evict("neo")
    assert c.accounts.get("neo").version == 2 and c.accounts.get("neo").currency == 51

    # the read models: the balance and the statement
    MemberProjection(c.accounts.app, c.read_models).catch_up()
    view_old = client.get("/v1/members/old", headers=shop).json()
    history = {
        user: client.get(f"/v1/members/{user}/history", headers=shop).json()["entries"]
        for user in ("neo", "old")
    }
    lines = {
        u: [(e["kind"], e["currency"], e["rank_points"], e["ref"]) for e in h]
        for u, h in history.items()
    }
    assert lines["old"] == [
        ("rank_changed", 0, 0, view_old["rank"]),
        ("award", 50, 1200, "w1.10.1"),
    ]
    assert lines["neo"] == [("award", 1, 1, "w1.11.1"), *lines["old"]]
    # paged one line at a time, the cursor walks through the enrolment's two lines
    seen, cursor = [], None
    while True:
        params: dict[str, Any] = {"limit": 1} | ({"cursor": cursor} if cursor else {})
        page = client.get("/v1/members/neo/history", headers=shop, params=params).json()
        seen += [e["ref"] for e in page["entries"]]
        cursor = page["next"]
        if cursor is None:
            break
    assert seen == [e["ref"] for e in history["neo"]]

    # the feed: the same kinds and data for both, with stable distinct ids
    got = {u: feed_of(client, feed, u) for u in ("neo", "old")}
    assert [e["type"] for e in got["old"]] == [
        "member.created",
        "member.awarded",
        "member.rank_changed",
    ]
    assert [(e["type"], e["data"]) for e in got["neo"][:3]] == [
        (e["type"], e["data"]) for e in got["old"]
    ]
    assert [e["id"] for e in feed_of(client, feed, "neo")] == [e["id"] for e in got["neo"]]
    assert len({e["id"] for e in got["neo"]}) == len(got["neo"]) == 4
    # a page of one event ends after the enrolment's three (never splits them)
    first = client.get("/v1/feed", params={"limit": 1}, headers=feed).json()["events"]
    assert [e["type"] for e in first] == [
        "member.created",
        "member.awarded",
        "member.rank_changed",
    ]

    # the rollups (the projection hands them the stored events as read from the log)
    app = c.accounts.app
    raw = [
        (n.id, app.mapper.to_domain_event(n)) for n in app.recorder.select_notifications(1, 1000)
    ]
    ids = {str(Member.create_id(u)): u for u in ("neo", "old")}
    facts: dict[str, list[Any]] = {"neo": [], "old": []}
    for f in account_facts(raw):
        facts[ids[f.member_id]].append((f.kind, f.currency, f.rank_points, f.rank_old, f.rank_new))
    assert facts["neo"][:3] == facts["old"]
    assert [k for k, *_ in facts["old"]] == ["created", "awarded", "rank"]

    # the Parquet export's account events
    key = b"k" * 32
    rows: dict[str, list[Any]] = {"neo": [], "old": []}
    names = {pseudonym(key, u): u for u in ("neo", "old")}
    today = datetime.now(UTC).date()  # the events' day (yesterday too, across midnight)
    for r in account_event_rows(MembersLog(app), key, {today, today - timedelta(days=1)}):
        rows[names[r.member]].append((r.type, r.currency, r.rank_points, r.ref))
    assert rows["neo"][:3] == rows["old"]
    assert [t for t, *_ in rows["old"]] == ["Created", "Awarded", "RankChanged"]
