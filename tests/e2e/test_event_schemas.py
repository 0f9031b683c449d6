"""The published payload schemas (docs/events/<type>.schema.json, issue 32 item 9),
checked against real events of a live run: ``loyalty serve`` with its worker children,
every account event made through the HTTP API and ``loyalty expiry run``, delivered to a
real webhook receiver and read from the feed. Payloads are plain JSON objects: ``lots``
an object (it was JSON inside a string), decimals never ``-0``."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest

from loyalty.application.delivery import EVENT_TYPES
from loyalty.config import Settings
from loyalty.domain.rules import DEFAULT_RULES_WIRE
from tests.e2e.live import cli, create_key, serve_logged, wait_for
from tests.e2e.test_webhooks import Receiver

ROOT = Path(__file__).resolve().parents[2]
SCHEMAS = ROOT / "docs" / "events"


def schema_of(event_type: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((SCHEMAS / f"{event_type}.schema.json").read_text())
    return loaded


def test_one_valid_schema_per_event_type_and_no_other() -> None:
    assert sorted(p.name for p in SCHEMAS.glob("*.schema.json")) == sorted(
        f"{t}.schema.json" for t in EVENT_TYPES
    )
    for event_type in EVENT_TYPES:
        schema = schema_of(event_type)
        jsonschema.Draft202012Validator.check_schema(schema)
        assert schema["properties"]["type"] == {"const": event_type}
        # what the schemas catch: JSON text in a string, a signed zero
        if event_type == "member.awarded":
            bad = {
                "id": "0b8f3c1e-6f1b-5d8e-9a57-2f3a4c5d6e7f",
                "type": event_type,
                "user_id": "u",
                "occurred_at": "2026-12-01T00:00:00Z",
                "data": {
                    "award_id": "w1.1.1",
                    "currency": 1,
                    "rank_points": 1,
                    "event_count": 1,
                    "rule_version": 1,
                    "fraction_currency": "0",
                    "fraction_rank_points": "0",
                    "lots": '{"2026-12":1}',
                    "on": None,
                },
            }
            assert not valid(bad)
            assert valid({**bad, "data": {**bad["data"], "lots": {"2026-12": 1}}})
            assert not valid(
                {**bad, "data": {**bad["data"], "lots": None, "fraction_currency": "-0"}}
            )


def valid(body: dict[str, Any]) -> bool:
    validator = jsonschema.Draft202012Validator(
        schema_of(body["type"]), format_checker=jsonschema.FormatChecker()
    )
    return validator.is_valid(body)


def check(body: dict[str, Any]) -> None:
    validator = jsonschema.Draft202012Validator(
        schema_of(body["type"]), format_checker=jsonschema.FormatChecker()
    )
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(body)]
    assert not errors, (body, errors)


@pytest.mark.slow
def test_real_events_of_a_live_run_match_their_published_schemas(settings: Settings) -> None:
    url = settings.database_url
    receiver = Receiver()
    try:
        with serve_logged(
            url,
            LOYALTY_WEBHOOK_ALLOW_PRIVATE_URLS="true",
            LOYALTY_FORGET_SETTLE_SECONDS="0",
            LOYALTY_AWARD_WINDOW_SECONDS="0.2",
        ) as (base, output):
            ops = {"Authorization": f"Bearer {create_key(url, 'operator', 'ops')}"}
            shop = {"Authorization": f"Bearer {create_key(url, 'shop', 'webshop')}"}
            site = {"Authorization": f"Bearer {create_key(url, 'ingest', 'games')}"}
            with httpx.Client(base_url=base, timeout=30) as http:
                hook = http.post(
                    "/v1/webhooks", json={"url": receiver.url, "event_types": []}, headers=ops
                )
                assert hook.status_code == 201, hook.text
                wire = copy.deepcopy(DEFAULT_RULES_WIRE)
                now = datetime.now(UTC)
                wire["currency_expiry"] = {
                    "after_months": 0,
                    "effective_from": now.strftime("%Y-%m"),
                }
                assert http.put("/v1/rules", json=wire, headers=ops).status_code == 200
                events = [
                    {
                        "event_id": f"e-{user}-{n}",
                        "user_id": user,
                        "type": "made_purchase",
                        "occurred_at": now.isoformat(),
                    }
                    for user in ("lia", "max")
                    for n in range(3)
                ]
                sent = http.post("/v1/ingress/batches", json={"events": events}, headers=site)
                assert sent.status_code == 202, sent.text
                wait_for(
                    lambda: (
                        http.get("/v1/members/lia", headers=shop).status_code == 200
                        and http.get("/v1/members/max", headers=shop).status_code == 200
                    ),
                    timeout=60,
                )
                spent = http.post(
                    "/v1/members/lia/spend", json={"order_id": "o-1", "amount": 4}, headers=shop
                )
                assert spent.status_code == 200, spent.text
                part = {"order_id": "o-1", "refund_id": "r-1", "amount": 1}
                refunded = http.post("/v1/members/lia/refunds", json=part, headers=shop)
                assert refunded.status_code == 200, refunded.text
                fix = {
                    "adjustment_id": "a-1",
                    "currency": 2,
                    "rank_points": 1,
                    "reason": "goodwill",
                }
                assert (
                    http.post("/v1/members/lia/adjustments", json=fix, headers=ops).status_code
                    == 200
                )
                month_after = datetime(
                    now.year + now.month // 12, now.month % 12 + 1, 1, 0, 0, 1, tzinfo=UTC
                )
                expired = cli(url, "expiry", "run", "--as-of", month_after.isoformat(), "--yes")
                assert expired.returncode == 0, expired.stderr
                gone = http.post("/v1/forget-requests", json={"user_id": "max"}, headers=ops)
                assert gone.status_code in (200, 202), gone.text

                def types_seen() -> set[str]:
                    return {b["type"] for b in receiver.bodies()}

                wait_for(lambda: types_seen() == set(EVENT_TYPES), timeout=90)
                feed = http.get("/v1/feed", params={"limit": 1000}, headers=ops).json()["events"]
    finally:
        receiver.close()
    bodies = receiver.bodies() + feed
    for body in bodies:
        check(body)
    awarded = [b for b in bodies if b["type"] == "member.awarded"]
    assert awarded and all(isinstance(b["data"]["lots"], dict) for b in awarded)
    assert '"-0' not in json.dumps(bodies)
    partial = [b for b in bodies if b["type"] == "member.refunded"]
    assert (
        partial and partial[0]["data"]["refund_id"] == "r-1" and partial[0]["data"]["amount"] == 1
    )
