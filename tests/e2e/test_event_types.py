"""One list of event types (issue 26): generated from the Member aggregate's events,
used by the feed, the webhook API schema, the console and the docs. And the feed's
award fractions are plain decimals, never a negative zero (issue 25)."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from eventsourcing.domain import Aggregate
from fastapi.testclient import TestClient

from loyalty.adapters.db import Database
from loyalty.adapters.keys import KeyStore
from loyalty.api.app import create_app
from loyalty.application.access import Role
from loyalty.application.delivery import EVENT_TYPES, FORGOTTEN
from loyalty.config import Settings
from loyalty.domain.expiry import CurrencyExpiry
from loyalty.domain.member import Member
from loyalty.domain.ranks import Rank, RankLadder
from tests.conftest import Clock

ROOT = Path(__file__).resolve().parents[2]
LADDER = RankLadder((Rank("bronze", 0), Rank("silver", 10)))


@pytest.fixture
def api(settings: Settings, db: Database, clock: Clock) -> Iterator[TestClient]:
    allow = settings.model_copy(update={"webhook_allow_private_urls": True})
    db.settings = allow  # type: ignore[misc]
    with TestClient(create_app(allow, db=db, clock=clock)) as c:
        yield c


def every_event(api: TestClient, user_id: str) -> Member:
    """A member with one of each of the aggregate's events, saved in the event store."""
    member = Member(user_id)
    member.award("x-1", 20, 20, 2, 1, LADDER, month="2020-01")  # Awarded, RankChanged
    member.spend("o-1", 5)
    member.refund("o-1")
    member.adjust("a-1", 3, 0, "goodwill", LADDER)
    assert member.expire(CurrencyExpiry(0), datetime.now(UTC))  # CurrencyExpired
    accounts = api.app.state.container.accounts  # type: ignore[attr-defined]
    accounts.save(member, fence=None)
    return member


def feed(api: TestClient, headers: dict[str, str]) -> list[dict[str, Any]]:
    page = api.get("/v1/feed", params={"limit": 1000}, headers=headers)
    assert page.status_code == 200, page.text
    return page.json()["events"]  # type: ignore[no-any-return]


def test_one_list_of_event_types_from_the_domain_everywhere(
    api: TestClient, db: Database, make_key: Callable[..., dict[str, str]]
) -> None:
    # the domain: every event class nested in Member that is stored (a leaf class)
    classes = [
        c for c in vars(Member).values() if isinstance(c, type) and issubclass(c, Aggregate.Event)
    ]
    stored = {
        "member." + re.sub(r"(?<!^)(?=[A-Z])", "_", c.__name__).lower()
        for c in classes
        if not any(o is not c and issubclass(o, c) for o in classes)
        and c is not Member.Enrolled  # stored only: read as Created, Awarded, RankChanged
    }
    assert set(EVENT_TYPES) == stored | {FORGOTTEN}
    assert "member.currency_expired" in EVENT_TYPES
    # the feed: a member with every event gives every type, and nothing else
    ops = make_key("operator", "ops")
    every_event(api, "typed")
    assert {e["type"] for e in feed(api, ops)} == set(EVENT_TYPES) - {FORGOTTEN}
    # the API: every type subscribes; the schema lists them all
    created = api.post(
        "/v1/webhooks",
        json={"url": "http://127.0.0.1:9/hook", "event_types": list(EVENT_TYPES)},
        headers=ops,
    )
    assert created.status_code == 201, created.text
    one = api.post(
        "/v1/webhooks",
        json={"url": "http://127.0.0.1:9/hook", "event_types": ["member.currency_expired"]},
        headers=ops,
    )
    assert one.status_code == 201, one.text
    schemas = api.get("/openapi.json").json()["components"]["schemas"]
    assert schemas["WebhookCreate"]["properties"]["event_types"]["items"]["enum"] == list(
        EVENT_TYPES
    )
    described = schemas["FeedItem"]["properties"]["type"]["description"]
    assert all(t in described for t in EVENT_TYPES if t != FORGOTTEN)
    # the console: one checkbox per type
    key = KeyStore(db).create(Role.OPERATOR, "console")
    token = re.search(r'name="csrf" value="([^"]+)"', api.get("/console/sign-in").text)
    assert token is not None
    api.post("/console/sign-in", data={"csrf": token.group(1), "key": key})
    page = api.get("/console/webhooks").text
    boxes = re.findall(r'name="event_type" value="([^"]+)"', page)
    assert boxes == list(EVENT_TYPES)
    # the docs: the API guide's and the architecture's "Events out" name every type
    for doc in ("docs/api.md", "docs/architecture.md"):
        text = (ROOT / doc).read_text()
        section = text[text.index("## Events out") :]
        missing = [t for t in EVENT_TYPES if f"`{t}`" not in section]
        assert not missing, f"{doc} does not list {missing}"


def test_award_fractions_are_never_a_negative_zero(
    api: TestClient, make_key: Callable[..., dict[str, str]]
) -> None:
    """Whole pending earnings leave a zero remainder that exact floor arithmetic signs
    (Decimal('-0')); the event records "0", and an award stored so before reads "0"."""
    ops = make_key("operator", "ops")
    member = Member("fraction")
    member.record_pending("p-1", Decimal("0.5"), Decimal("0.5"), 1, 1, LADDER)
    member.record_pending("p-2", Decimal("0.5"), Decimal("0.5"), 1, 1, LADDER)
    member.record_pending("p-3", Decimal("2"), Decimal("2"), 1, 1, LADDER)
    # as an award recorded before the fix was stored
    member._awarded(
        award_id="old-1",
        currency=0,
        rank_points=0,
        event_count=0,
        rule_version=1,
        fraction_currency="-0.0",
        fraction_rank_points="-0",
        lots=None,
        on=None,
    )
    accounts = api.app.state.container.accounts  # type: ignore[attr-defined]
    accounts.save(member, fence=None)
    awards = [e for e in feed(api, ops) if e["type"] == "member.awarded"]
    fractions = [
        (a["data"]["fraction_currency"], a["data"]["fraction_rank_points"]) for a in awards
    ]
    assert fractions == [("0.5", "0.5"), ("0.0", "0.0"), ("0.0", "0.0"), ("0.0", "0")]
