"""Storage accounting over HTTP (GET /v1/storage) and the CLI (`loyalty storage`,
`loyalty retention run`), on both backends."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from loyalty.adapters.db import Database
from loyalty.adapters.ingress_log import caps_partition_name, partition_name
from loyalty.adapters.storage import table_name
from loyalty.api.app import create_app
from loyalty.bootstrap import build_pipeline, build_projection
from loyalty.cli import app as cli
from loyalty.config import Settings

BATCHES = "/v1/ingress/batches"
NOW = datetime(2030, 3, 4, 12, tzinfo=UTC)


class FixedClock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def events(day_offset: int, n: int, prefix: str = "") -> list[dict[str, object]]:
    at = NOW - timedelta(days=day_offset)
    return [
        {
            "event_id": f"{prefix}{day_offset}-{i}",
            "user_id": f"user-{i % 20}",
            "type": "played_game",
            "occurred_at": (at + timedelta(seconds=i)).isoformat(),
            "attributes": {"result": "win"},
        }
        for i in range(n)
    ]


def drain(db: Database, expected: int) -> None:
    """Process ``expected`` events. On PostgreSQL a transaction in flight anywhere on the
    server (another test session) holds the gap-safe reader back for a moment."""
    pipeline = build_pipeline(db)
    done = 0
    deadline = time.monotonic() + 30
    while done < expected and time.monotonic() < deadline:
        done += pipeline.drain(range(16))
        if done < expected:
            time.sleep(0.05)
    assert done == expected


@pytest.fixture
def past_client(settings: Settings, db: Database) -> Iterator[TestClient]:
    """An API whose clock is NOW (2030-03-04), so events of the days before are accepted."""
    with TestClient(create_app(settings, db=db, clock=FixedClock(NOW))) as client:
        yield client


def test_storage_endpoint_reports_rows_and_bytes_per_location(
    past_client: TestClient, db: Database, make_key: Callable[..., dict[str, str]]
) -> None:
    ingest = make_key("ingest")
    for offset in (0, 1):
        resp = past_client.post(BATCHES, json={"events": events(offset, 50)}, headers=ingest)
        assert resp.status_code == 202, resp.text
    drain(db, 100)
    build_projection(db).catch_up()
    operator = make_key("operator", "ops")

    resp = past_client.get("/v1/storage", headers=operator)

    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["backend"] == db.backend
    where = {loc["name"]: loc for loc in body["locations"]}
    if db.backend == "postgresql":
        for offset in (0, 1):
            name = partition_name((NOW - timedelta(days=offset)).date())
            assert where[name]["rows"] == 50 and where[name]["kind"] == "ingress"
            assert where[name]["bytes"] > 0
        assert where["members_events"]["rows"] > 0
        assert where["members_events"]["kind"] == "event_store"
        assert "ingress_events" not in where  # the partitioned parent holds nothing itself
        # the day's cap counters: a partition made with its ingress day, dropped with it
        caps = caps_partition_name(NOW.date())
        assert where[caps]["kind"] == "pipeline" and "pipeline_caps" not in where
        assert table_name(caps) == f"Daily cap counters, {NOW.date().isoformat()}"
    else:
        assert where["ingress_events"]["rows"] == 100 and where["ingress_events"]["bytes"] > 0
        assert where["stored_events"]["rows"] > 0
        assert body["estimated"] is False  # this SQLite has dbstat
        assert where["pipeline_caps"]["kind"] == "pipeline"
    assert where["member_balances"]["rows"] == 20
    assert where["member_balances"]["kind"] == "read_model"
    assert where["member_history"]["rows"] > 0
    assert where["pipeline_pending"]["kind"] == "pipeline"  # pending earnings are listed
    assert where["forget_requests"]["kind"] == "forget"
    assert body["total"] == {
        "rows": sum(loc["rows"] for loc in body["locations"]),
        "bytes": sum(loc["bytes"] for loc in body["locations"]),
    }
    assert body["database_bytes"] >= body["total"]["bytes"] > 0


def test_storage_endpoint_is_for_operators(
    past_client: TestClient, make_key: Callable[..., dict[str, str]]
) -> None:
    assert past_client.get("/v1/storage").status_code == 401
    forbidden = past_client.get("/v1/storage", headers=make_key("shop", "frontend"))
    assert forbidden.status_code == 403 and forbidden.json()["code"] == "forbidden"


def test_retention_and_storage_commands(
    past_client: TestClient,
    settings: Settings,
    db: Database,
    make_key: Callable[..., dict[str, str]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ingest = make_key("ingest")
    for offset in (2, 3):  # 2030-03-02 and 2030-03-01
        resp = past_client.post(BATCHES, json={"events": events(offset, 30)}, headers=ingest)
        assert resp.status_code == 202
    drain(db, 60)
    late = events(2, 1, prefix="late-")  # after the drain: unprocessed, on 2030-03-02
    assert past_client.post(BATCHES, json={"events": late}, headers=ingest).status_code == 202
    monkeypatch.setenv("LOYALTY_DATABASE_URL", settings.database_url)
    runner = CliRunner()

    strict = runner.invoke(
        cli, ["retention", "run", "--as-of", "2030-03-11T06:00:00Z", "--strict", "--yes"]
    )
    assert strict.exit_code == 1, strict.output
    assert "2030-03-01" in strict.output and "KEPT" in strict.output
    assert "2030-03-02" in strict.output and "not processed" in strict.output
    assert "bytes reclaimed" in strict.output

    as_json = runner.invoke(
        cli, ["retention", "run", "--as-of", "2030-03-11T06:00:00Z", "--json", "--yes"]
    )
    assert as_json.exit_code == 0, as_json.output  # without --strict a kept day is not an error
    report = json.loads(as_json.stdout)
    assert report["kept"] == [{"day": "2030-03-02", "unprocessed_rows": 1, "reason": "unprocessed"}]

    bad = runner.invoke(cli, ["retention", "run", "--as-of", "2030-03-11"])
    assert bad.exit_code == 2

    storage = runner.invoke(cli, ["storage"])
    assert storage.exit_code == 0, storage.output
    assert "ingress" in storage.output and "total" in storage.output
    listed = json.loads(runner.invoke(cli, ["storage", "--json"]).stdout)
    ingress_rows = sum(loc["rows"] for loc in listed["locations"] if loc["kind"] == "ingress")
    assert ingress_rows == (1 if db.backend == "sqlite" else 31)
