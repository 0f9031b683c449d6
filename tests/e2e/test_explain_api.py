"""Award explanations and the rule dry run over HTTP (issue 20), on both backends."""

from __future__ import annotations

import copy
from datetime import timedelta
from typing import Any

from fastapi.testclient import TestClient

from loyalty.application.projections import MemberProjection
from loyalty.domain.rules import DEFAULT_RULES_WIRE
from tests.conftest import drain_pipeline


def drain(client: TestClient) -> int:
    container = client.app.state.container  # type: ignore[attr-defined]
    return drain_pipeline(container.db, container.accounts.app)


def project(client: TestClient) -> int:
    container = client.app.state.container  # type: ignore[attr-defined]
    return MemberProjection(container.accounts.app, container.read_models).catch_up()


def test_every_award_in_the_history_links_its_explanation(
    client: TestClient, make_key: Any, clock: Any
) -> None:
    shop, operator = make_key("shop", "frontend"), make_key("operator", "ops")
    yesterday = clock.now - timedelta(days=1)
    events = [
        {
            "event_id": f"g{i}",
            "user_id": "ada",
            "type": "played_game",
            "occurred_at": (yesterday + timedelta(seconds=i)).isoformat(),
            "attributes": {"result": "win" if i % 2 else "loss"},
        }
        for i in range(53)
    ] + [
        {
            "event_id": "p1",
            "user_id": "ada",
            "type": "made_purchase",
            "occurred_at": yesterday.isoformat(),
            "attributes": {"tier": "premium"},
        }
    ]
    resp = client.post("/v1/ingress/batches", json={"events": events}, headers=make_key("ingest"))
    assert resp.status_code == 202, resp.text
    assert drain(client) == 54
    project(client)
    history = client.get("/v1/members/ada/history", headers=shop).json()["entries"]
    awards = [e for e in history if e["kind"] == "award"]
    assert awards and all(e["explanation"] for e in awards)
    assert all(e["explanation"] is None for e in history if e["kind"] == "rank_changed")
    body = client.get(awards[0]["explanation"], headers=shop).json()
    assert body["status"] == "recorded" and body["complete"] is True
    games = next(t for t in body["by_event_type"] if t["event_type"] == "played_game")
    # 50 per day count; 3 capped; the win multiplier doubled 25 of those that earned
    assert games["events"] == 53
    assert games["capped"] == [{"daily_cap": 50, "events": 3}]
    assert games["multipliers"] == [{"when": {"result": "win"}, "factor": "2", "events": 25}]
    assert games["currency"] == str(5 * 25 + 10 * 25)
    assert body["currency"] == {
        "contributed": "390",
        "carried_in": "0",
        "credited": 390,
        "to_credit": None,  # #32 item 8: only a pending award has one
        "carried_out": "0",
    }
    assert body["rank_points"]["contributed"] == "757.5"  # 750 + 7.5: half a point carried
    assert body["rank_points"]["carried_out"] == "0.5"
    assert body["events"]["status"] == "retained" and len(body["events"]["items"]) == 54
    # an operator may read it too; an ingest key may not; unknown ids are 404
    assert client.get(awards[0]["explanation"], headers=operator).status_code == 200
    assert client.get(awards[0]["explanation"], headers=make_key("ingest")).status_code == 403
    missing = client.get("/v1/members/ada/awards/w1.2.3", headers=shop)
    assert missing.status_code == 404 and missing.json()["code"] == "award_not_found"


def test_dry_run_over_http(client: TestClient, make_key: Any, clock: Any) -> None:
    operator = make_key("operator", "ops")
    yesterday = clock.now - timedelta(days=1)
    events = [
        {
            "event_id": f"l{i}",
            "user_id": f"m{i % 3}",
            "type": "made_purchase",
            "occurred_at": yesterday.isoformat(),
        }
        for i in range(9)
    ]
    client.post("/v1/ingress/batches", json={"events": events}, headers=make_key("ingest"))
    candidate = copy.deepcopy(DEFAULT_RULES_WIRE)
    candidate["rules"][3]["currency"] = 12  # made_purchase: 10 -> 12
    day = yesterday.date()
    body = {
        "rules": candidate,
        "from": day.isoformat(),
        "to": (day + timedelta(days=1)).isoformat(),
    }
    resp = client.post("/v1/rules/dry-run", json=body, headers=operator)
    assert resp.status_code == 200, resp.text
    report = resp.json()
    assert report["events"] == 9 and report["members_with_difference"] == 3
    assert report["totals"]["currency"] == {"current": 90, "candidate": 108, "difference": 18}
    assert [d["currency"]["difference"] for d in report["largest_differences"]] == [6, 6, 6]
    assert client.get("/v1/members/m0", headers=operator).status_code == 404  # read-only
    old = {**body, "from": (day - timedelta(days=60)).isoformat()}
    refused = client.post("/v1/rules/dry-run", json=old, headers=operator)
    assert refused.status_code == 422 and refused.json()["code"] == "period_not_retained"
    assert "outside retention" in refused.json()["detail"]
    bad = {**body, "rules": {"rules": [{"event_type": "x"}], "ranks": []}}
    assert client.post("/v1/rules/dry-run", json=bad, headers=operator).status_code == 422
    shop = make_key("shop", "frontend")
    assert client.post("/v1/rules/dry-run", json=body, headers=shop).status_code == 403


def test_dry_run_command(client: TestClient, make_key: Any, clock: Any, tmp_path: Any) -> None:
    """``loyalty rules dry-run``: the same report as the API; days outside retention
    are refused with exit 2 and the oldest retained day."""
    import json

    from tests.e2e.live import cli

    url = client.app.state.container.settings.database_url  # type: ignore[attr-defined]
    yesterday = clock.now - timedelta(days=1)
    events = [
        {
            "event_id": f"j{i}",
            "user_id": "jo",
            "type": "joined_competition",
            "occurred_at": yesterday.isoformat(),
        }
        for i in range(7)
    ]
    client.post("/v1/ingress/batches", json={"events": events}, headers=make_key("ingest"))
    candidate = copy.deepcopy(DEFAULT_RULES_WIRE)
    candidate["rules"][2]["daily_cap"] = 6  # joined_competition: 5 a day -> 6
    rules = tmp_path / "candidate.json"
    rules.write_text(json.dumps(candidate))
    day = yesterday.date()
    done = cli(url, "rules", "dry-run", str(rules), "--from", day.isoformat())
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["totals"]["currency"] == {"current": 100, "candidate": 120, "difference": 20}
    assert report["by_event_type"][0]["capped"] == {"current": 2, "candidate": 1}
    old = (day - timedelta(days=30)).isoformat()
    refused = cli(url, "rules", "dry-run", str(rules), "--from", old)
    assert refused.returncode == 2 and "outside retention" in refused.stderr


def test_dry_run_periods_are_inclusive_default_to_today_and_warn_when_empty(
    client: TestClient, make_key: Any, clock: Any, tmp_path: Any
) -> None:
    """#33 item 5: one convention (both days included) in the CLI, the API and the
    console; the default includes today; an empty period says so."""
    import json

    from tests.e2e.live import cli

    operator = make_key("operator")
    url = client.app.state.container.settings.database_url  # type: ignore[attr-defined]
    today = clock.now.date()
    events = [
        {"event_id": f"t{i}", "user_id": f"t{i}", "type": "made_purchase"}
        | {"occurred_at": clock.now.isoformat()}
        for i in range(4)
    ]
    client.post("/v1/ingress/batches", json={"events": events}, headers=make_key("ingest"))
    candidate = copy.deepcopy(DEFAULT_RULES_WIRE)
    candidate["rules"][3]["currency"] = 12
    rules = tmp_path / "candidate.json"
    rules.write_text(json.dumps(candidate))

    by_default = cli(url, "rules", "dry-run", str(rules))  # today's data: counted
    assert by_default.returncode == 0, by_default.stderr
    report = json.loads(by_default.stdout)
    assert report["events"] == 4 and report["period"]["to"] == today.isoformat()
    assert report["warnings"] == [] and "warning" not in by_default.stderr

    one_day = cli(url, "rules", "dry-run", str(rules), "--from", str(today), "--to", str(today))
    assert one_day.returncode == 0, one_day.stderr
    assert json.loads(one_day.stdout)["period"] == {"from": str(today), "to": str(today)}
    assert json.loads(one_day.stdout)["events"] == 4

    yesterday = str(today - timedelta(days=1))
    empty = cli(url, "rules", "dry-run", str(rules), "--from", yesterday, "--to", yesterday)
    assert empty.returncode == 0, empty.stderr
    assert "warning: no retained events from" in empty.stderr
    assert json.loads(empty.stdout)["events"] == 0

    body = {"rules": candidate, "from": str(today), "to": str(today)}  # the API: the same
    api = client.post("/v1/rules/dry-run", json=body, headers=operator).json()
    assert api["events"] == 4 and api["warnings"] == []
    api_empty = client.post(
        "/v1/rules/dry-run", json={**body, "from": yesterday, "to": yesterday}, headers=operator
    ).json()
    assert api_empty["events"] == 0 and api_empty["warnings"][0].startswith("no retained events")
    backwards = cli(url, "rules", "dry-run", str(rules), "--from", str(today), "--to", yesterday)
    assert backwards.returncode == 2
    assert "must be on or after 'from'" in backwards.stderr.replace("\n", " ")
