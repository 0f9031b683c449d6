"""`loyalty export` (issue 18): Parquet files per dataset and day, read back by DuckDB (a
reader none of us wrote) with the same totals as GET /v1/reports/daily; members only as
keyed pseudonyms; refused without the key; atomic and resumable; a forgotten member's
events are not exported afterwards."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Iterator
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import duckdb
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from loyalty.adapters.db import Database
from loyalty.adapters.parquet_export import ParquetSink
from loyalty.application.reporting import EventColumns
from loyalty.bootstrap import build_projection
from loyalty.cli import app
from loyalty.config import Settings
from tests.conftest import drain_pipeline, earlier_today

KEY = "k" * 40
NOW = datetime.now(UTC).replace(microsecond=0)
TODAY = NOW.date()
FIRST = TODAY - timedelta(days=3)


def export_cli(settings: Settings, out: Path, *more: str, key: str | None = KEY) -> Any:
    # one day of retention: days before yesterday accept no more ingress, so are final
    env = {"LOYALTY_DATABASE_URL": settings.database_url, "LOYALTY_RETENTION_DAYS": "1"}
    if key is not None:
        env["LOYALTY_EXPORT_PSEUDONYM_KEY"] = key
    return CliRunner().invoke(
        app,
        [
            "export",
            "--from",
            FIRST.isoformat(),
            "--to",
            TODAY.isoformat(),
            "--out",
            str(out),
            *more,
        ],
        env=env,
        catch_exceptions=False,
    )


@pytest.fixture
def traffic(
    client: TestClient, make_key: Callable[..., dict[str, str]], db: Database
) -> Iterator[dict[str, str]]:
    events = [
        {
            "event_id": f"x{i}",
            "user_id": f"user-{i % 5}",
            "type": ["logged_on", "played_game", "made_purchase"][i % 3],
            "occurred_at": (
                earlier_today(NOW, timedelta(minutes=i)) - timedelta(days=i % 4)
            ).isoformat(),
            "attributes": {"tier": "premium"} if i % 2 else {},
        }
        for i in range(60)
    ]
    assert (
        client.post("/v1/ingress/batches", json={"events": events}, headers=make_key()).json()[
            "accepted"
        ]
        == 60
    )
    container = client.app.state.container  # type: ignore[attr-defined]
    drain_pipeline(db, container.accounts.app)
    shop = make_key("shop", "web")
    for i in range(5):
        spent = client.post(
            f"/v1/members/user-{i}/spend", json={"order_id": f"o{i}", "amount": 3}, headers=shop
        )
        assert spent.status_code == 200, spent.text
    build_projection(db, container.accounts.app).catch_up()
    yield make_key("operator", "ops")


def sql(query: str) -> list[tuple[Any, ...]]:
    return duckdb.sql(query).fetchall()


def test_duckdb_reads_the_same_totals_as_the_report(
    client: TestClient, settings: Settings, tmp_path: Path, traffic: dict[str, str]
) -> None:
    out = tmp_path / "export"
    result = export_cli(settings, out)
    assert result.exit_code == 0, result.output
    report = client.get(
        "/v1/reports/daily",
        params={"from": FIRST.isoformat(), "to": TODAY.isoformat()},
        headers=traffic,
    ).json()["days"]
    activity = sql(
        f"SELECT day, sum(events), sum(earning_events), sum(currency_awarded) "
        f"FROM read_parquet('{out}/activity/**/*.parquet', hive_partitioning=true) "
        "GROUP BY day ORDER BY day"
    )
    want = [
        (
            date.fromisoformat(d["day"]),
            d["events"],
            d["earning_events"],
            Decimal(str(d["currency_awarded"])),
        )
        for d in report
        if d["events"]
    ]
    assert [
        (a[0] if isinstance(a[0], date) else date.fromisoformat(str(a[0])), *a[1:3], Decimal(a[3]))
        for a in activity
    ] == want
    assert sum(w[1] for w in want) == 60
    accounts = sql(
        f"SELECT day, outstanding_currency, currency_spent, currency_credited, members "
        f"FROM read_parquet('{out}/accounts/**/*.parquet', hive_partitioning=true) ORDER BY day"
    )
    assert [tuple(a[1:]) for a in accounts] == [
        (d["outstanding_currency"], d["currency_spent"], d["currency_credited"], d["members"])
        for d in report
    ]
    # the account events: every member's balance is the sum of its exported changes
    events = sql(
        f"SELECT member, sum(currency) FROM read_parquet('{out}/account_events/**/*.parquet', "
        "hive_partitioning=true) GROUP BY member ORDER BY member"
    )
    balances = {
        hmac.new(KEY.encode(), f"user-{i}".encode(), hashlib.sha256).hexdigest(): client.get(
            f"/v1/members/user-{i}", headers=traffic
        ).json()["currency"]
        for i in range(5)
    }
    assert dict(events) == balances
    assert sum(balances.values()) == report[-1]["outstanding_currency"]
    # no user id anywhere in the files
    for path in out.rglob("*.parquet"):
        assert b"user-" not in path.read_bytes()


def test_account_events_need_the_key(settings: Settings, tmp_path: Path, traffic: Any) -> None:
    refused = export_cli(settings, tmp_path / "a", key=None)
    assert refused.exit_code == 2 and "LOYALTY_EXPORT_PSEUDONYM_KEY" in refused.output
    assert not (tmp_path / "a" / "account_events").exists()
    rollups = export_cli(settings, tmp_path / "b", "--rollups-only", key=None)
    assert rollups.exit_code == 0, rollups.output
    assert (tmp_path / "b" / "activity").is_dir()
    assert not (tmp_path / "b" / "account_events").exists()


def test_final_days_are_not_written_twice_and_forgotten_members_not_again(
    client: TestClient,
    settings: Settings,
    db: Database,
    tmp_path: Path,
    traffic: dict[str, str],
) -> None:
    out = tmp_path / "export"
    assert export_cli(settings, out).exit_code == 0
    past = out / "activity" / f"day={FIRST.isoformat()}" / "part-0.parquet"
    today = out / "account_events" / f"day={TODAY.isoformat()}" / "part-0.parquet"
    stamps = (past.stat().st_mtime_ns, today.stat().st_mtime_ns)
    container = client.app.state.container  # type: ignore[attr-defined]
    container.forget.request("user-1")
    container.forget.run_pending()
    again = export_cli(settings, out)
    assert again.exit_code == 0, again.output
    assert past.stat().st_mtime_ns == stamps[0]  # a final day: skipped
    assert today.stat().st_mtime_ns != stamps[1]  # today may still change: written again
    gone = hmac.new(KEY.encode(), b"user-1", hashlib.sha256).hexdigest()
    members = {r[0] for r in sql(f"SELECT member FROM read_parquet('{today}')")}
    assert gone not in members and len(members) == 4


def test_a_failed_write_leaves_no_file_and_no_half_file(tmp_path: Path) -> None:
    def pages() -> Iterator[EventColumns]:
        for first in range(0, 70_000, 5_000):  # more than one row group reaches the file
            n = range(first, first + 5_000)
            yield EventColumns(
                n, ["m"] * len(n), [1] * len(n), ["Awarded"] * len(n), [NOW] * len(n),
                [1] * len(n), [1] * len(n), [None] * len(n), [None] * len(n),
            )  # fmt: skip
        raise OSError("disk full")

    sink = ParquetSink(tmp_path)
    with pytest.raises(OSError, match="disk full"):
        sink.write_events({TODAY}, pages())
    folder = tmp_path / "account_events" / f"day={TODAY.isoformat()}"
    assert list(folder.iterdir()) == []
    assert not sink.complete("account_events", TODAY)
    assert sink.write_events({TODAY}, iter([])) == {TODAY: 0}
    assert sink.complete("account_events", TODAY)
