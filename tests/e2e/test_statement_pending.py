"""The statement adds up to the balance (issue 32 item 7): the history's first page
carries the pending part (earnings weighed by the real pipeline, not yet recorded) with
the link to its explanation, on both backends."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from fastapi.testclient import TestClient

from tests.conftest import Clock
from tests.e2e.test_expiry import at, project, view
from tests.e2e.test_pending_rank_expiry import ingest, pending, windows

Headers = dict[str, str]


def test_history_shows_the_pending_part_and_its_explanation(
    client: TestClient, clock: Clock, make_key: Callable[..., Headers]
) -> None:
    shop, site = make_key("shop", "shop"), make_key("ingest")
    at(clock, "2026-11-10T12:00:00+00:00")
    now = datetime(2026, 11, 10, 11, 0, tzinfo=UTC)
    ingest(client, site, "hana", 1, "made_purchase", now)  # a new account: recorded at once
    windows(client)
    project(client)
    first: dict[str, Any] = client.get("/v1/members/hana/history", headers=shop).json()
    assert first["pending"] is None  # nothing pending
    ingest(client, site, "hana", 2, "made_purchase", now)  # weighed, not recorded
    windows(client)
    project(client)
    assert pending(client, "hana")
    me = view(client, shop, "hana")
    assert me["pending_currency"] > 0
    page = client.get("/v1/members/hana/history", headers=shop, params={"limit": 1})
    assert page.status_code == 200, page.text
    body = page.json()
    assert body["pending"] == {
        "currency": me["pending_currency"],
        "rank_points": me["pending_rank_points"],
        "explanation": "/v1/members/hana/awards/pending",
    }
    entries = client.get("/v1/members/hana/history", headers=shop).json()["entries"]
    listed = sum(e["currency"] for e in entries)
    assert listed + body["pending"]["currency"] == me["currency"]  # they add up
    explained = client.get(body["pending"]["explanation"], headers=shop)
    assert explained.status_code == 200 and explained.json()["status"] == "pending"
    # a later page carries no pending line (it is the newest part of the statement)
    later = client.get(
        "/v1/members/hana/history", headers=shop, params={"limit": 1, "cursor": body["next"]}
    ).json()
    assert later["pending"] is None
