"""GET /v1/feed: committed account events in commit order, on both backends."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from fastapi.testclient import TestClient

from loyalty.adapters.db import Database
from loyalty.application.delivery import decode_cursor, encode_cursor
from loyalty.bootstrap import build_forget_service

FEED = "/v1/feed"


def adjust(client: TestClient, headers: dict[str, str], user: str, n: int, currency: int) -> None:
    response = client.post(
        f"/v1/members/{user}/adjustments",
        json={"adjustment_id": f"a{n}", "currency": currency, "rank_points": 1, "reason": "r"},
        headers=headers,
    )
    assert response.status_code == 200, response.text


def read_all(client: TestClient, headers: dict[str, str], limit: int = 3) -> list[dict]:  # type: ignore[type-arg]
    events, after = [], None
    while True:
        params: dict[str, str | int] = {"limit": limit}
        if after is not None:
            params["after"] = after
        page = client.get(FEED, params=params, headers=headers).json()
        if not page["events"]:
            return events
        events += page["events"]
        after = page["next"]


def test_feed_returns_committed_events_in_order_with_stable_ids(
    client: TestClient, make_key: Callable[..., dict[str, str]]
) -> None:
    operator, feed = make_key("operator", "ops"), make_key("feed", "crm")
    for n, user in enumerate(["alice", "bob", "alice", "carol", "bob", "alice"]):
        adjust(client, operator, user, n, 10 + n)
    events = read_all(client, feed)
    kinds = [(e["type"], e["user_id"]) for e in events]
    assert [k for k in kinds if k[0] == "member.adjusted"] == [
        ("member.adjusted", u) for u in ["alice", "bob", "alice", "carol", "bob", "alice"]
    ]
    assert kinds.count(("member.created", "alice")) == 1
    first = next(e for e in events if e["type"] == "member.adjusted")
    # the event's fields pass through (a field added to the event later shows up too)
    assert (
        first["data"].items()
        >= {
            "adjustment_id": "a0",
            "currency": 10,
            "rank_points": 1,
            "reason": "r",
        }.items()
    )
    assert not {"originator_id", "originator_version", "timestamp"} & first["data"].keys()
    assert first["occurred_at"].endswith("Z")
    # the operator may read it too; ids are the same on every read
    again = read_all(client, operator, limit=100)
    assert [e["id"] for e in again] == [e["id"] for e in events]
    assert len({e["id"] for e in events}) == len(events)
    # the next page after the end is empty, and its cursor stays put
    end = client.get(FEED, params={"limit": 1000}, headers=feed).json()["next"]
    page = client.get(FEED, params={"after": end}, headers=feed).json()
    assert page == {"events": [], "next": end}


def test_feed_needs_a_feed_or_operator_key_and_a_cursor_it_gave_out(
    client: TestClient, make_key: Callable[..., dict[str, str]]
) -> None:
    assert client.get(FEED).status_code == 401
    assert client.get(FEED, headers=make_key("shop", "shop")).status_code == 403
    bad = client.get(FEED, params={"after": "not-a-cursor"}, headers=make_key("feed", "f"))
    assert bad.status_code == 400 and bad.json()["code"] == "invalid_cursor"
    assert client.get(FEED, params={"wait": 31}, headers=make_key("feed", "g")).status_code == 422
    assert decode_cursor(encode_cursor(123456789)) == 123456789


def test_long_poll_answers_when_an_event_commits(
    client: TestClient, make_key: Callable[..., dict[str, str]]
) -> None:
    operator, feed = make_key("operator", "ops"), make_key("feed", "crm")
    adjust(client, operator, "dave", 1, 5)
    end = client.get(FEED, params={"limit": 1000}, headers=feed).json()["next"]
    started = time.monotonic()
    empty = client.get(FEED, params={"after": end, "wait": 0.5}, headers=feed).json()
    assert empty["events"] == [] and time.monotonic() - started >= 0.45
    timer = threading.Timer(0.4, adjust, (client, operator, "dave", 2, 7))
    timer.start()
    started = time.monotonic()
    page = client.get(FEED, params={"after": end, "wait": 10}, headers=feed).json()
    waited = time.monotonic() - started
    timer.join()
    assert [e["data"]["adjustment_id"] for e in page["events"]] == ["a2"]
    assert 0.3 < waited < 5


def test_a_forgotten_members_events_are_gone_from_the_feed(
    client: TestClient, db: Database, make_key: Callable[..., dict[str, str]]
) -> None:
    operator, feed = make_key("operator", "ops"), make_key("feed", "crm")
    adjust(client, operator, "erin", 1, 5)
    adjust(client, operator, "frank", 2, 6)
    adjust(client, operator, "erin", 3, 7)
    before = read_all(client, feed)
    assert {e["user_id"] for e in before} == {"erin", "frank"}
    service = build_forget_service(db)
    service._settle = service._settle * 0  # type: ignore[attr-defined]  # no other process
    service.request("erin")
    assert service.run_pending() == 1
    remaining = read_all(client, feed)
    assert remaining == [e for e in before if e["user_id"] == "frank"]
