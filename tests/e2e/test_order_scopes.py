"""Order ids and adjustment ids are scoped by source (the key's name), and account
streams stored before sources were recorded still load and keep their idempotency.

``legacy_member_stream_v1.json`` is a member's stream exactly as the code before this
change stored it (``Adjusted``, ``Spent``, ``Refunded`` without a source), captured from
that code's SQLite event store; it is written here through the library's recorder on
each backend."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from uuid import UUID

from eventsourcing.persistence import StoredEvent
from fastapi.testclient import TestClient

from loyalty.application.accounts import AwardCommand
from loyalty.application.projections import MemberProjection
from loyalty.domain.member import Member, scoped_key

Headers = dict[str, str]
LEGACY = json.loads((Path(__file__).parent / "legacy_member_stream_v1.json").read_text())


def container(client: TestClient) -> object:
    return client.app.state.container  # type: ignore[attr-defined]


def award(client: TestClient, user_id: str, currency: int) -> None:
    c: object = container(client)
    c.accounts.award_many(  # type: ignore[attr-defined]
        [AwardCommand(user_id, f"w-{user_id}", currency, 0, 1, 1)],
        c.rules.current().ranks,  # type: ignore[attr-defined]
    )


def post(client: TestClient, path: str, headers: Headers, **body: object) -> tuple[int, object]:
    response = client.post(path, json=body, headers=headers)
    return response.status_code, response.json()


def balance(client: TestClient, headers: Headers, user: str) -> int:
    return int(client.get(f"/v1/members/{user}", headers=headers).json()["currency"])


def test_order_ids_are_scoped_by_source(
    client: TestClient, make_key: Callable[..., Headers]
) -> None:
    shop_a, shop_b = make_key("shop", "shop-a"), make_key("shop", "shop-b")
    award(client, "bea", 1000)
    spend = "/v1/members/bea/spend"
    assert post(client, spend, shop_a, order_id="o-77", amount=100)[0] == 200
    # B's o-77 is B's own order: charged, not answered as A's replay
    assert post(client, spend, shop_b, order_id="o-77", amount=5) == (
        200,
        {"order_id": "o-77", "amount": 5, "currency": 895, "replayed": False},
    )
    # A's replay is still a replay (same answer, nothing charged)
    assert post(client, spend, shop_a, order_id="o-77", amount=100) == (
        200,
        {"order_id": "o-77", "amount": 100, "currency": 900, "replayed": True},
    )
    assert balance(client, shop_a, "bea") == 895
    # B cannot refund A's order; A's and B's refunds each put back their own amount
    refunds = "/v1/members/bea/refunds"
    assert post(client, spend, shop_a, order_id="only-a", amount=10)[0] == 200
    status, body = post(client, refunds, shop_b, order_id="only-a")
    assert (status, body["code"]) == (404, "order_not_found")  # type: ignore[index]
    assert post(client, refunds, shop_b, order_id="o-77")[1] == {
        "order_id": "o-77",
        "amount": 5,
        "currency": 890,
        "replayed": False,
        "refund_id": None,
        "refundable": 0,
    }
    assert post(client, refunds, shop_a, order_id="o-77")[1]["currency"] == 990  # type: ignore[index]
    # a key with the same name (a rotated key) is the same source
    rotated = make_key("shop", "shop-a")
    # (a replay: the balance right after the original order)
    assert post(client, spend, rotated, order_id="only-a", amount=10)[1]["currency"] == 885  # type: ignore[index]
    assert balance(client, shop_a, "bea") == 990


def test_adjustment_ids_are_scoped_by_source(
    client: TestClient, make_key: Callable[..., Headers]
) -> None:
    ops, other = make_key("operator", "ops"), make_key("operator", "ops-2")
    path = "/v1/members/cy/adjustments"
    body = {"adjustment_id": "adj-1", "currency": 10, "rank_points": 0, "reason": "r"}
    assert post(client, path, ops, **body)[1]["currency"] == 10  # type: ignore[index]
    assert post(client, path, other, **body)[1]["currency"] == 20  # type: ignore[index]
    assert post(client, path, ops, **body)[1]["currency"] == 10  # type: ignore[index]  # replay
    status, problem = post(client, path, ops, **{**body, "currency": 11})
    assert (status, problem["code"]) == (409, "adjustment_conflict")  # type: ignore[index]


def test_streams_stored_before_sources_load_and_stay_idempotent(
    client: TestClient, make_key: Callable[..., Headers]
) -> None:
    accounts = container(client).accounts  # type: ignore[attr-defined]
    rows = [
        StoredEvent(
            originator_id=UUID(row[0]),
            originator_version=row[1],
            topic=row[2],
            state=row[3].encode(),
        )
        for row in LEGACY["rows"]
    ]
    assert {r.topic.rsplit(".", 1)[1] for r in rows} >= {"Spent", "Refunded", "Adjusted"}
    assert all(b'"source"' not in r.state for r in rows)  # today's format: no source
    accounts.app.recorder.insert_events(rows)
    assert Member.create_id("legacy-amy") == rows[0].originator_id
    member = accounts.get("legacy-amy")
    assert (member.currency, member.orders) == (
        80,
        {scoped_key(None, "o-77"): 30, scoped_key(None, "o-78"): 20},
    )
    shop = make_key("shop", "any-shop")
    spend = "/v1/members/legacy-amy/spend"
    # a legacy order id answers every source as a replay: never charged twice
    assert post(client, spend, shop, order_id="o-78", amount=20)[1] == {
        "order_id": "o-78",
        "amount": 20,
        "currency": 80,
        "replayed": True,
    }
    assert post(client, spend, shop, order_id="o-78", amount=21)[0] == 409
    refunds = "/v1/members/legacy-amy/refunds"
    assert post(client, refunds, shop, order_id="o-77")[1]["currency"] == 100  # type: ignore[index]  # refunded before
    assert post(client, refunds, shop, order_id="o-78")[1]["currency"] == 100  # type: ignore[index]
    ops = make_key("operator", "ops")
    adjust = "/v1/members/legacy-amy/adjustments"
    legacy = {"adjustment_id": "adj-1", "currency": 100, "rank_points": 0, "reason": "goodwill"}
    assert post(client, adjust, ops, **legacy)[1]["currency"] == 100  # type: ignore[index]  # replay, as stored
    assert balance(client, shop, "legacy-amy") == 100
    assert post(client, spend, shop, order_id="o-new", amount=1)[1]["currency"] == 99  # type: ignore[index]
    # new events carry their source (class_version 2); the read models take both
    stored = list(accounts.app.events.get(Member.create_id("legacy-amy")))
    assert type(stored[-1]).__name__ == "Spent" and stored[-1].source == "any-shop"
    assert type(stored[-2]).__name__ == "Refunded" and stored[-2].source is None  # legacy order
    assert stored[3].source is None
    MemberProjection(accounts.app, container(client).read_models).catch_up()  # type: ignore[attr-defined]
    history = client.get("/v1/members/legacy-amy/history", headers=shop).json()["entries"]
    assert [(e["kind"], e["ref"]) for e in history][:4] == [
        ("spend", "o-new"),
        ("refund", "o-78"),
        ("spend", "o-78"),
        ("refund", "o-77"),
    ]


def refund_events(client: TestClient, user: str) -> list[object]:
    c: object = container(client)
    app = c.accounts.app  # type: ignore[attr-defined]
    events = app.repository.event_store.get(Member.create_id(user))
    return [e for e in events if type(e).__name__ == "Refunded"]


def test_an_operator_refunds_a_shops_order_and_is_recorded_on_it(
    client: TestClient, make_key: Callable[..., Headers]
) -> None:
    """#27: an operator key answered order_not_found for a shop's order (ids are scoped
    by the key that spent them). Now it names the source; the refund records it."""
    shop, other = make_key("shop", "webshop"), make_key("shop", "till")
    ops = make_key("operator", "ops-ann")
    award(client, "cid", 100)
    assert post(client, "/v1/members/cid/spend", shop, order_id="o-9", amount=40)[0] == 200
    refunds = "/v1/members/cid/refunds"
    assert post(client, refunds, ops, order_id="o-9")[0] == 404  # its own: none
    # a shop cannot refund another shop's order by naming it
    status, body = post(client, refunds, other, order_id="o-9", source="webshop")
    assert status == 403, body
    assert post(client, refunds, ops, order_id="o-9", source="webshop") == (
        200,
        {
            "order_id": "o-9",
            "amount": 40,
            "currency": 100,
            "replayed": False,
            "refund_id": None,
            "refundable": 0,
        },
    )
    # once: the shop's own refund (or the operator's again) is a replay
    assert post(client, refunds, shop, order_id="o-9")[1] == {
        "order_id": "o-9",
        "amount": 40,
        "currency": 100,
        "replayed": True,
        "refund_id": None,
        "refundable": 0,
    }
    assert post(client, refunds, ops, order_id="o-9", source="webshop")[0] == 200
    assert balance(client, shop, "cid") == 100
    [refunded] = refund_events(client, "cid")
    assert (refunded.source, refunded.by) == ("webshop", "ops-ann")  # type: ignore[attr-defined]
