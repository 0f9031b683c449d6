"""Currency expiry end to end: rules over HTTP, the account through the API (its clock
set), the index through the projection, and ``loyalty expiry run --as-of`` travelling
over two years of month ends (leap February, the last second of a month, a refund after
expiry) on both backends."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from datetime import datetime
from typing import Any

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from loyalty.bootstrap import build_projection
from loyalty.cli import app
from loyalty.config import Settings
from loyalty.domain.rules import DEFAULT_RULES_WIRE
from tests.conftest import Clock, drain_pipeline

Headers = dict[str, str]


@pytest.fixture
def run(settings: Settings) -> Callable[..., dict[str, Any]]:
    """run(as_of) -> the report of ``loyalty expiry run --as-of as_of --json``."""
    runner = CliRunner()

    def invoke(as_of: str) -> dict[str, Any]:
        result = runner.invoke(
            app,
            ["expiry", "run", "--as-of", as_of, "--json", "--yes"],
            env={"LOYALTY_DATABASE_URL": settings.database_url},
            catch_exceptions=False,
        )
        assert result.exit_code == 0, result.output
        report: dict[str, Any] = json.loads(result.stdout)
        return report

    return invoke


def container(client: TestClient) -> Any:
    return client.app.state.container  # type: ignore[attr-defined]


def project(client: TestClient) -> None:
    c = container(client)
    build_projection(c.db, c.accounts.app).catch_up()


def put_expiry(client: TestClient, op: Headers, **expiry: object) -> dict[str, Any]:
    wire = copy.deepcopy(DEFAULT_RULES_WIRE)
    wire["currency_expiry"] = expiry
    response = client.put("/v1/rules", json=wire, headers=op)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def at(clock: Clock, text: str) -> None:
    clock.now = datetime.fromisoformat(text)


def adjust(client: TestClient, op: Headers, user: str, ref: str, currency: int) -> None:
    body = {"adjustment_id": ref, "currency": currency, "rank_points": 0, "reason": "earned"}
    response = client.post(f"/v1/members/{user}/adjustments", json=body, headers=op)
    assert response.status_code == 200, response.text


def view(client: TestClient, shop: Headers, user: str) -> dict[str, Any]:
    body: dict[str, Any] = client.get(f"/v1/members/{user}", headers=shop).json()
    return body


def expired(report: dict[str, Any]) -> tuple[int, int]:
    return report["lots_expired"], report["amount_expired"]


def test_two_years_of_month_ends(
    client: TestClient,
    clock: Clock,
    make_key: Callable[..., Headers],
    run: Callable[..., dict[str, Any]],
) -> None:
    op, shop = make_key("operator", "ops"), make_key("shop", "shop")
    at(clock, "2024-01-15T12:00:00+00:00")
    rules = put_expiry(client, op, after_months=12)
    assert rules["currency_expiry"]["effective_from"] == "2024-01"  # stamped: turned on now
    adjust(client, op, "amy", "jan", 100)
    at(clock, "2024-02-29T23:59:59.999999+00:00")  # the last instant of a leap February
    adjust(client, op, "amy", "feb", 50)
    at(clock, "2024-03-10T00:00:00+00:00")
    order = {"order_id": "o-1", "amount": 30}
    assert client.post("/v1/members/amy/spend", json=order, headers=shop).status_code == 200
    project(client)
    assert view(client, shop, "amy")["expiring"] == [
        {"amount": 70, "on": "2025-01-31"},  # the oldest is spent first
        {"amount": 50, "on": "2025-02-28"},
    ]
    assert expired(run("2025-01-31T23:59:59.999999Z")) == (0, 0)
    assert expired(run("2025-02-01T00:00:00Z")) == (1, 70)
    assert view(client, shop, "amy")["currency"] == 50
    assert expired(run("2025-02-01T00:00:00Z")) == (0, 0)  # the same run again: nothing

    # a refund after its lot expired: that part expires again at once
    at(clock, "2025-02-10T00:00:00+00:00")
    refund = client.post("/v1/members/amy/refunds", json={"order_id": "o-1"}, headers=shop)
    assert refund.json() == {
        "order_id": "o-1",
        "amount": 30,
        "currency": 50,
        "replayed": False,
        "refund_id": None,
        "refundable": 0,
    }

    assert expired(run("2025-02-28T23:59:59Z")) == (0, 0)
    assert expired(run("2025-03-01T00:00:00Z")) == (1, 50)  # leap February, 12 months on
    assert view(client, shop, "amy")["currency"] == 0

    # the second year: currency earned in the last second of a year
    at(clock, "2025-12-31T23:59:59.999999+00:00")
    adjust(client, op, "amy", "dec", 10)
    project(client)
    assert view(client, shop, "amy")["expiring"] == [{"amount": 10, "on": "2026-12-31"}]
    assert expired(run("2026-12-31T23:59:59Z")) == (0, 0)
    assert expired(run("2027-01-01T00:00:00Z")) == (1, 10)
    project(client)
    history = client.get("/v1/members/amy/history", headers=shop).json()
    entries = history["entries"] if isinstance(history, dict) else history
    kinds = [(e["kind"], e["currency"]) for e in entries if e["kind"] == "expiry"]
    assert sorted(kinds) == [("expiry", -70), ("expiry", -50), ("expiry", -30), ("expiry", -10)]


def test_turning_expiry_on_later_never_expires_earlier_currency_unless_asked(
    client: TestClient,
    clock: Clock,
    make_key: Callable[..., Headers],
    run: Callable[..., dict[str, Any]],
) -> None:
    op, shop = make_key("operator", "ops"), make_key("shop", "shop")
    at(clock, "2024-01-10T00:00:00+00:00")
    adjust(client, op, "bo", "early", 40)  # expiry off: the month is tracked anyway
    at(clock, "2024-06-10T00:00:00+00:00")
    assert put_expiry(client, op, after_months=1)["currency_expiry"]["effective_from"] == "2024-06"
    adjust(client, op, "bo", "later", 5)
    project(client)
    assert expired(run("2030-01-01T00:00:00Z")) == (1, 5)  # only what was earned after
    assert view(client, shop, "bo")["currency"] == 40
    # a later version keeps the month expiry was turned on
    again = put_expiry(client, op, after_months=2)
    assert again["currency_expiry"]["effective_from"] == "2024-06"
    assert expired(run("2030-01-01T00:00:00Z")) == (0, 0)
    # the operator asks explicitly
    put_expiry(client, op, after_months=1, retroactive=True)
    assert expired(run("2030-01-01T00:00:00Z")) == (1, 40)
    assert view(client, shop, "bo")["currency"] == 0


def test_pending_currency_counts_in_the_month_it_was_earned(
    client: TestClient,
    clock: Clock,
    make_key: Callable[..., Headers],
    run: Callable[..., dict[str, Any]],
) -> None:
    op, shop = make_key("operator", "ops"), make_key("shop", "shop")
    at(clock, "2026-11-01T00:00:30+00:00")
    put_expiry(client, op, after_months=0, effective_from="2026-01")
    events = [
        {"event_id": "e1", "user_id": "cy", "type": "made_purchase",
         "occurred_at": "2026-10-31T23:59:59.999Z"},
        {"event_id": "e2", "user_id": "cy", "type": "made_purchase",
         "occurred_at": "2026-11-01T00:00:00Z"},
    ]  # fmt: skip
    response = client.post(
        "/v1/ingress/batches", json={"events": events}, headers=make_key("ingest", "site")
    )
    assert response.status_code == 202 and response.json()["accepted"] == 2, response.text
    drain_pipeline(container(client).db, container(client).accounts.app)  # one recording
    project(client)
    assert view(client, shop, "cy")["expiring"] == [
        {"amount": 10, "on": "2026-10-31"},
        {"amount": 10, "on": "2026-11-30"},
    ]
    assert expired(run("2026-11-01T00:00:01Z")) == (1, 10)
    assert view(client, shop, "cy")["currency"] == 10


def test_ranks_requalify_by_calendar_year_with_grace(
    client: TestClient,
    clock: Clock,
    make_key: Callable[..., Headers],
    run: Callable[..., dict[str, Any]],
) -> None:
    op, shop = make_key("operator", "ops"), make_key("shop", "shop")
    wire = copy.deepcopy(DEFAULT_RULES_WIRE)
    wire["rank_qualification"] = {"period": "calendar_year", "grace_days": 31}
    assert client.put("/v1/rules", json=wire, headers=op).status_code == 200
    at(clock, "2024-12-31T23:59:59+00:00")  # the last second of a leap year
    body = {"adjustment_id": "r1", "currency": 0, "rank_points": 1200, "reason": "earned"}
    assert client.post("/v1/members/dee/adjustments", json=body, headers=op).status_code == 200
    project(client)
    me = view(client, shop, "dee")
    assert (me["rank"], me["rank_points_this_period"]) == ("silver", 1200)
    assert me["rank_valid_until"] == "2025-01-31"  # the year's end plus the grace
    assert (me["rank_points_to_keep"], me["rank_points_to_next"]) == (0, 5000 - 1200)
    at(clock, "2025-01-10T00:00:00+00:00")
    me = view(client, shop, "dee")
    assert (me["rank"], me["rank_points_this_period"], me["rank_points_to_keep"]) == (
        "silver",
        0,
        1000,
    )
    assert run("2025-01-31T23:59:59Z")["rank_changes"] == 0  # still in the grace
    report = run("2025-02-01T00:00:00Z")
    assert (report["ranked_members"], report["rank_changes"], report["rank_downgrades"]) == (
        1,
        1,
        1,
    )
    assert run("2025-02-01T00:00:00Z")["rank_changes"] == 0  # decided once
    me = view(client, shop, "dee")
    assert (me["rank"], me["rank_points"], me["privileges"]) == ("bronze", 1200, ["member_prices"])
    project(client)
    feed = client.get("/v1/members/dee/history", headers=shop).json()
    entries = feed["entries"] if isinstance(feed, dict) else feed
    assert sorted(e["ref"] for e in entries if e["kind"] == "rank_changed") == ["bronze", "silver"]


def test_expired_currency_in_the_daily_report(
    client: TestClient,
    clock: Clock,
    make_key: Callable[..., Headers],
    run: Callable[..., dict[str, Any]],
) -> None:
    """The rollups count the real ``CurrencyExpired`` events: the liability falls by
    what expired, and the report says so (issue 18 reads issue 19's event)."""
    op, shop = make_key("operator", "ops"), make_key("shop", "shop")
    at(clock, "2024-01-15T12:00:00+00:00")
    put_expiry(client, op, after_months=12)
    adjust(client, op, "amy", "jan", 100)
    adjust(client, op, "bob", "jan", 40)
    at(clock, "2024-06-15T12:00:00+00:00")
    adjust(client, op, "bob", "jun", 5)
    project(client)  # the expiry index is the projection's
    assert expired(run("2025-02-01T00:00:00Z")) == (2, 140)
    project(client)
    days = client.get(
        "/v1/reports/daily", params={"from": "2024-01-01", "to": "2026-12-31"}, headers=op
    ).json()["days"]
    assert sum(d["currency_expired"] for d in days) == 140
    assert sum(d["currency_credited"] + d["currency_adjusted"] for d in days) == 145
    assert days[-1]["outstanding_currency"] == 5 == view(client, shop, "bob")["currency"]


def test_a_future_as_of_needs_yes_and_a_dry_run_shows_what_would_expire(
    client: TestClient,
    clock: Clock,
    make_key: Callable[..., Headers],
    settings: Settings,
) -> None:
    """#27: `expiry run --as-of <future>` expired currency for real, at once. Now it is
    refused without --yes; --dry-run counts members and total and changes nothing."""
    op, shop = make_key("operator", "ops"), make_key("shop", "shop")
    at(clock, "2026-01-10T00:00:00+00:00")
    put_expiry(client, op, after_months=12)
    adjust(client, op, "ann", "a", 70)
    adjust(client, op, "ben", "b", 30)
    project(client)
    future = "2099-02-01T00:00:00Z"
    env = {"LOYALTY_DATABASE_URL": settings.database_url}

    def cli(*args: str) -> Any:
        return CliRunner().invoke(app, ["expiry", "run", *args], env=env, catch_exceptions=False)

    refused = cli("--as-of", future)
    assert refused.exit_code == 2
    assert "in the future" in refused.stderr and "--yes" in refused.stderr
    dry = cli("--as-of", future, "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert "100 currency of 2 members would expire" in dry.stdout
    wire = json.loads(cli("--as-of", future, "--dry-run", "--json").stdout)
    assert (wire["dry_run"], wire["members"], wire["amount_expired"]) == (True, 2, 100)
    assert view(client, shop, "ann")["currency"] == 70  # nothing changed
    done = cli("--as-of", future, "--yes", "--json")
    assert done.exit_code == 0 and json.loads(done.stdout)["amount_expired"] == 100
    assert view(client, shop, "ann")["currency"] == 0
    past = cli("--as-of", "2026-02-01T00:00:00Z", "--json")  # a back-fill needs no --yes
    assert past.exit_code == 0, past.output
