"""The daily report outlives retention (issue 18): a 30-day history, then
`loyalty retention run --as-of` day after day; after every day's ingress partition (or
rows) is dropped, GET /v1/reports/daily answers exactly what it answered before. Also:
operator only, a range check, and a day processed before the rollups began is kept."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from loyalty.adapters.db import Database
from loyalty.adapters.ingress_log import create_ingress_log
from loyalty.application.ingress import IncomingEvent, IngestService
from loyalty.bootstrap import build_projection
from loyalty.cli import app
from loyalty.config import Settings
from tests.conftest import drain_pipeline

NOW = datetime.now(UTC).replace(microsecond=0)
TODAY = NOW.date()
FIRST = TODAY - timedelta(days=29)
TYPES = ["logged_on", "played_game", "made_purchase", "joined_competition", "mystery"]


def history(db: Database, days: int = 30, per_day: int = 12) -> None:
    rnd = random.Random(30)
    service = IngestService(
        create_ingress_log(db),
        clock=lambda: NOW,
        retention=timedelta(days=days + 5),
        future_skew=timedelta(minutes=5),
        shard_count=db.settings.shard_count,
    )
    first = TODAY - timedelta(days=days - 1)
    for d in range(days):
        day_start = datetime.combine(first + timedelta(days=d), datetime.min.time(), UTC)
        events = [
            IncomingEvent(
                f"d{d}-{i}",
                f"u{rnd.randrange(15)}",
                rnd.choice(TYPES),
                min(NOW, day_start + timedelta(minutes=rnd.randrange(1440))),
                '{"result": "win", "tier": "premium"}' if i % 2 else "{}",
            )
            for i in range(per_day)
        ]
        service.ingest(rnd.choice(["shop", "games"]), events)


def ingress_rows(db: Database) -> int:
    with db.read() as conn:
        return int(conn.execute(sa.text("SELECT count(*) FROM ingress_events")).scalar_one())


def retention_cli(settings: Settings, as_of: datetime, *more: str) -> Any:
    return CliRunner().invoke(
        app,
        ["retention", "run", "--as-of", as_of.isoformat(), "--json", "--yes", *more],
        env={"LOYALTY_DATABASE_URL": settings.database_url, "LOYALTY_RETENTION_DAYS": "1"},
        catch_exceptions=False,
    )


@pytest.mark.slow  # in-process but long: left out of make test-fast
def test_a_30_day_report_is_unchanged_after_every_day_was_dropped(
    client: TestClient,
    make_key: Callable[..., dict[str, str]],
    db: Database,
    settings: Settings,
) -> None:
    history(db)
    container = client.app.state.container  # type: ignore[attr-defined]
    drain_pipeline(db, container.accounts.app)
    build_projection(db, container.accounts.app).catch_up()
    operator = make_key("operator", "ops")
    params = {"from": FIRST.isoformat(), "to": TODAY.isoformat()}
    before = client.get("/v1/reports/daily", params=params, headers=operator)
    assert before.status_code == 200, before.text
    body = before.json()
    assert len(body["days"]) == 30
    assert sum(d["events"] for d in body["days"]) == 360 == ingress_rows(db)
    assert all(d["events"] == 12 for d in body["days"])
    assert body["days"][-1]["outstanding_currency"] > 0
    for d in range(1, 30):
        # with 1 day of retention, as of FIRST + d + 2 every day up to FIRST + d expires
        result = retention_cli(
            settings,
            datetime.combine(FIRST, datetime.min.time(), UTC) + timedelta(days=d + 1, hours=1),
        )
        assert result.exit_code == 0, result.output
        left = ingress_rows(db)
        assert left == 360 - 12 * d, (d, left)
        again = client.get("/v1/reports/daily", params=params, headers=operator)
        assert again.json() == body, d
    assert ingress_rows(db) == 12  # only today's activity is left, and the report is whole


def test_the_report_is_for_operators_and_checks_its_range(
    client: TestClient, make_key: Callable[..., dict[str, str]]
) -> None:
    day = TODAY.isoformat()
    assert client.get("/v1/reports/daily", params={"from": day, "to": day}).status_code == 401
    ingest = client.get(
        "/v1/reports/daily", params={"from": day, "to": day}, headers=make_key("ingest")
    )
    assert ingest.status_code == 403
    operator = make_key("operator", "ops")
    backwards = client.get(
        "/v1/reports/daily",
        params={"from": day, "to": (TODAY - timedelta(days=1)).isoformat()},
        headers=operator,
    )
    assert backwards.status_code == 422 and backwards.json()["code"] == "invalid_range"
    empty = client.get("/v1/reports/daily", params={"from": day, "to": day}, headers=operator)
    assert empty.json()["days"][0]["events"] == 0
    # days at the edges of the calendar: a 422 naming the field, not a 500 (#27)
    for first, last, field in [
        ("9999-12-31", "9999-12-31", "from"),
        (day, "9999-12-31", "to"),
        ("0001-01-01", day, "from"),
    ]:
        edge = client.get("/v1/reports/daily", params={"from": first, "to": last}, headers=operator)
        assert edge.status_code == 422, edge.text
        assert field in {e["loc"].split(".")[-1] for e in edge.json()["errors"]}


def test_a_day_processed_before_the_rollups_began_is_kept_and_reported(
    client: TestClient, db: Database, settings: Settings
) -> None:
    """An upgraded deployment: rows the pipeline processed before migration 0010 are in
    no rollup; retention keeps their day (--strict fails) until told to drop it."""
    history(db, days=3, per_day=4)
    container = client.app.state.container  # type: ignore[attr-defined]
    drain_pipeline(db, container.accounts.app)
    with db.write() as conn:  # what migration 0010 records on an upgraded database
        conn.execute(
            sa.text(
                "INSERT INTO rollup_origin (shard, txid, seq) "
                "SELECT shard, txid, seq FROM pipeline_checkpoints WHERE txid > 0 OR seq > 0"
            )
        )
    as_of = datetime.combine(TODAY, datetime.min.time(), UTC) + timedelta(hours=1)
    strict = retention_cli(settings, as_of, "--strict")
    assert strict.exit_code == 1, strict.output
    assert "not rolled up" in strict.output
    assert ingress_rows(db) == 12  # nothing dropped
    dropped = retention_cli(settings, as_of, "--drop-unrolled")
    assert dropped.exit_code == 0, dropped.output
    assert ingress_rows(db) == 8  # yesterday and today: inside the window


def test_retention_with_a_future_as_of_needs_yes_and_a_dry_run_drops_nothing(
    db: Database, settings: Settings
) -> None:
    """#27: `retention run --as-of <future>` dropped for real, at once, every day due by
    then. Now it is refused without --yes; --dry-run lists the days and drops nothing."""
    history(db, days=3, per_day=4)
    before = ingress_rows(db)
    future = datetime(2099, 1, 1, tzinfo=UTC)
    env = {"LOYALTY_DATABASE_URL": settings.database_url, "LOYALTY_RETENTION_DAYS": "1"}

    def cli(*args: str) -> Any:
        return CliRunner().invoke(
            app, ["retention", "run", "--as-of", future.isoformat(), *args], env=env
        )

    refused = cli()
    assert refused.exit_code == 2 and "--yes" in refused.stderr
    dry = cli("--dry-run", "--json")
    assert dry.exit_code == 0, dry.output
    plan = json.loads(dry.stdout)
    assert plan["cutoff"] == "2098-12-31"
    assert {str(TODAY - timedelta(days=d)) for d in range(3)} <= set(plan["days"])
    assert ingress_rows(db) == before  # nothing dropped


def test_the_daily_report_says_which_types_no_current_rule_weighs(
    client: TestClient,
    make_key: Callable[..., dict[str, str]],
    db: Database,
    settings: Settings,
) -> None:
    """#32 item 2's last part: accepted events of a type the rules do not weigh are a
    line of the day's report (API and ``loyalty report``), not only a metric."""
    container = client.app.state.container  # type: ignore[attr-defined]
    site, operator = make_key("ingest", "games"), make_key("operator", "ops")
    events = [
        {"event_id": f"u-{i}", "user_id": "uma", "type": t, "occurred_at": NOW.isoformat()}
        for i, t in enumerate(["levelled_up", "levelled_up", "made_purchase", "waved"])
    ]
    sent = client.post("/v1/ingress/batches", json={"events": events}, headers=site)
    assert sent.json()["unweighed_types"] == {"levelled_up": 2, "waved": 1}
    drain_pipeline(db, container.accounts.app)
    build_projection(db, container.accounts.app).catch_up()
    day = TODAY.isoformat()
    body = client.get("/v1/reports/daily", params={"from": day, "to": day}, headers=operator)
    assert body.status_code == 200, body.text
    assert body.json()["days"][0]["unweighed_types"] == {"levelled_up": 2, "waved": 1}
    shown = CliRunner().invoke(
        app,
        ["report", "--from", day, "--to", day],
        env={"LOYALTY_DATABASE_URL": settings.database_url},
        catch_exceptions=False,
    )
    assert shown.exit_code == 0, shown.output
    assert "unweighed types (no current rule weighs them): levelled_up 2, waved 1" in " ".join(
        shown.output.split()
    )
