"""Pending earnings where they meet requalification, rules changes and currency expiry
(issue 25, items 5 and 6), through the API, the real pipeline and ``loyalty expiry run
--as-of``, on both backends.

- A rank lift is recorded at once when the pending rank points reach the rank under the
  programme's qualification rules: after a requalification downgrade (the points of the
  period, not lifetime, against the rank now held), and under a new ladder.
- What ``GET /v1/members/{id}`` shows as currency a spend accepts, always: pending
  currency earned in a month whose lot has expired expires at recording and is never
  shown as spendable."""

from __future__ import annotations

import copy
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from fastapi.testclient import TestClient

from loyalty.adapters.pending_store import PendingTable
from loyalty.bootstrap import build_pipeline
from loyalty.domain.member import Member, account_events
from loyalty.domain.rules import DEFAULT_RULES_WIRE
from tests.conftest import Clock, drain_with
from tests.e2e.test_expiry import at, container, expired, project, put_expiry, run, view

__all__ = ["run"]  # the fixture, imported for these tests

Headers = dict[str, str]


def ladder(silver: int, *, rolling_days: int | None = 30) -> dict[str, Any]:
    wire = copy.deepcopy(DEFAULT_RULES_WIRE)
    wire["ranks"] = [
        {"name": "bronze", "min_rank_points": 0, "privileges": ["member_prices"]},
        {"name": "silver", "min_rank_points": silver, "privileges": ["free_shipping"]},
        {"name": "gold", "min_rank_points": 100_000, "privileges": ["priority_support"]},
    ]
    if rolling_days is not None:
        wire["rank_qualification"] = {"period": {"rolling_days": rolling_days}}
    return wire


def put_rules(client: TestClient, op: Headers, wire: dict[str, Any]) -> None:
    response = client.put("/v1/rules", json=wire, headers=op)
    assert response.status_code == 200, response.text


_seq = [0]


def ingest(
    client: TestClient, key: Headers, user: str, n: int, kind: str, occurred: datetime
) -> None:
    events = []
    for _ in range(n):
        _seq[0] += 1
        events.append(
            {
                "event_id": f"p{_seq[0]}",
                "user_id": user,
                "type": kind,
                "occurred_at": occurred.isoformat().replace("+00:00", "Z"),
            }
        )
    response = client.post("/v1/ingress/batches", json={"events": events}, headers=key)
    assert response.status_code == 202 and response.json()["accepted"] == n, response.text


def windows(client: TestClient) -> None:
    """Every ingested event through the real pipeline, nothing recorded but what the
    pipeline records at once (new accounts, rank lifts)."""
    c = container(client)
    drain_with(build_pipeline(c.db, c.accounts.app), c.db, record=False)


def stored(client: TestClient, user: str) -> Member:
    """The account as recorded in the event store (no pending folded in)."""
    app = container(client).accounts.app
    member: Member = app.repository.get(Member.create_id(user))
    return member


def pending(client: TestClient, user: str) -> bool:
    return user in PendingTable(container(client).db).load([user])


def test_after_a_requalification_downgrade_earning_enough_again_lifts_at_once(
    client: TestClient,
    make_key: Callable[..., Headers],
    run: Callable[..., dict[str, Any]],
) -> None:
    """Issue 25 item 5: rolling 30 days, silver at 100. 120 points -> silver; the job
    as of the next period -> bronze; 120 more points today (240 in the period) lift the
    member back at once, as they lift a new member. Fails before the fix: the row's need
    was the lifetime need of the next rank above 120 points (gold), so the member stayed
    bronze until the award interval."""
    op, shop, site = make_key("operator", "ops"), make_key("shop", "shop"), make_key("ingest")
    put_rules(client, op, ladder(100))
    now = datetime.now(UTC)
    ingest(client, site, "ann", 12, "played_game", now)  # 10 rank points each
    windows(client)
    assert stored(client, "ann").rank == "silver"  # a new account: recorded at once
    project(client)  # member_ranks: what the requalification pass reads
    report = run((now + timedelta(days=31)).isoformat())
    assert (report["rank_changes"], report["rank_downgrades"]) == (1, 1)
    assert stored(client, "ann").rank == "bronze"

    ingest(client, site, "ann", 12, "played_game", now)
    ingest(client, site, "bea", 24, "played_game", now)  # the same points, new
    windows(client)
    for user in ("ann", "bea"):
        member = stored(client, user)
        assert (member.rank, pending(client, user)) == ("silver", False), user
    ann = view(client, shop, "ann")
    assert (ann["rank"], ann["rank_points_this_period"]) == ("silver", 240)
    assert ann["rank_points_to_next"] == 100_000 - 240
    kinds = [
        type(e).__name__
        for s in container(client).accounts.app.events.get(stored(client, "ann").id)
        for e in account_events(s)  # an Enrolled: Created, Awarded, RankChanged
    ]
    assert kinds[-2:] == ["Awarded", "RankChanged"]


def test_a_new_ladder_judges_the_next_window_at_once(
    client: TestClient, make_key: Callable[..., Headers]
) -> None:
    """A pending row whose rank need was noted under one ladder: after a new rules
    version lowers the threshold, the next window of the member lifts it at once (the
    need is derived again under the new version). Fails before the fix: the old need
    (880 points for silver at 1000) stood until the award interval. Lifetime ranks and a
    qualification period alike."""
    op, site = make_key("operator", "ops"), make_key("ingest")
    now = datetime.now(UTC)
    for user, rolling in (("cy", None), ("di", 30)):
        put_rules(client, op, ladder(1000, rolling_days=rolling))
        ingest(client, site, user, 12, "played_game", now)
        windows(client)  # the account, 120 points: bronze
        ingest(client, site, user, 5, "played_game", now)
        windows(client)  # pending: 50 points, need noted under silver at 1000
        assert (stored(client, user).rank, pending(client, user)) == ("bronze", True)
        put_rules(client, op, ladder(150, rolling_days=rolling))
        ingest(client, site, user, 1, "played_game", now)
        windows(client)  # 120 + 60 >= 150
        assert (stored(client, user).rank, pending(client, user)) == ("silver", False), user


def test_pending_currency_of_an_expired_lot_is_neither_shown_nor_spent(
    client: TestClient,
    clock: Clock,
    make_key: Callable[..., Headers],
    run: Callable[..., dict[str, Any]],
) -> None:
    """Issue 25 item 6: ``after_months: 0``; earn 10 in October; the job as of November
    expires it; late events for October arrive: that currency expires at recording, so
    the view shows 0 and a spend of 10 is refused, both before and after. A late event
    of the open month is shown and spendable alike. Fails before the fix: the view
    showed the October pending 10 as currency while the spend answered "0 available"."""
    op, shop, site = make_key("operator", "ops"), make_key("shop", "shop"), make_key("ingest")
    at(clock, "2026-11-01T00:00:30+00:00")
    put_expiry(client, op, after_months=0, effective_from="2026-01")
    october = datetime(2026, 10, 31, 23, 59, 59, tzinfo=UTC)
    ingest(client, site, "ed", 1, "made_purchase", october)  # 10 currency
    windows(client)  # a new account: recorded at once, lot 2026-10
    project(client)
    assert expired(run("2026-11-01T00:00:01Z")) == (1, 10)
    assert view(client, shop, "ed")["currency"] == 0

    ingest(client, site, "ed", 1, "made_purchase", october - timedelta(seconds=1))  # late
    windows(client)
    assert pending(client, "ed")
    me = view(client, shop, "ed")
    assert (me["currency"], me["pending_currency"]) == (0, 0)
    order = {"order_id": "o-1", "amount": 10}
    refused = client.post("/v1/members/ed/spend", json=order, headers=shop)
    assert refused.status_code == 409, refused.text
    assert view(client, shop, "ed")["currency"] == 0

    ingest(client, site, "ed", 1, "made_purchase", datetime(2026, 11, 1, 0, 0, 5, tzinfo=UTC))
    windows(client)
    me = view(client, shop, "ed")
    assert (me["currency"], me["pending_currency"]) == (10, 10)
    spent = client.post("/v1/members/ed/spend", json=order, headers=shop)
    assert spent.status_code == 200 and spent.json()["currency"] == 0, spent.text
    me = view(client, shop, "ed")
    assert (me["currency"], me["pending_currency"], me["lifetime_currency"]) == (0, 0, 30)
    assert me["expiring"] == []
