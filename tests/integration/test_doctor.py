"""`loyalty doctor` on both backends: it finds the impossible states the old forget-me
race left (a stream without its first event, its quarantined events, a balance row
without a stream) and `--repair` finishes erasing them; the accounts and read models of
everyone else are untouched and the projection keeps moving."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from loyalty.adapters.db import Database
from loyalty.adapters.event_store import event_store_env
from loyalty.adapters.read_models import ReadModels
from loyalty.application.accounts import Accounts, AwardCommand, Members
from loyalty.application.projections import MemberProjection
from loyalty.cli import app
from loyalty.config import Settings
from loyalty.domain.member import Member
from loyalty.domain.ranks import Rank, RankLadder
from tests.integration.test_projections import plant_orphan

LADDER = RankLadder((Rank("bronze", 0), Rank("silver", 30)))


@pytest.fixture
def members(settings: Settings) -> Iterator[Members]:
    application = Members(env=event_store_env(settings))
    yield application
    application.close()


def cli(settings: Settings, *args: str) -> Any:
    return CliRunner().invoke(
        app,
        list(args),
        env={"LOYALTY_DATABASE_URL": settings.database_url},
        catch_exceptions=False,
    )


def test_doctor_finds_and_repairs_what_the_race_left(
    settings: Settings, db: Database, members: Members
) -> None:
    accounts = Accounts(members)
    accounts.award_many(
        [AwardCommand(u, "w1", 10, 5, 1, 1) for u in ("alice", "bob", "carol")], LADDER
    )
    projection = MemberProjection(members, ReadModels(db), batch_size=5)
    projection.catch_up()
    healthy = cli(settings, "doctor", "--json")
    assert healthy.exit_code == 0, healthy.output
    assert json.loads(healthy.stdout)["found"]["healthy"] is True

    left = plant_orphan(db, members, "ghost")
    events = "members_events" if db.backend == "postgresql" else "stored_events"
    carol = Member.create_id("carol")
    with db.write() as conn:  # carol's stream erased, her read models not (a crash)
        conn.execute(
            sa.text(f"DELETE FROM {events} WHERE originator_id = :m"),
            {"m": str(carol) if db.backend == "postgresql" else carol.hex},
        )
    accounts.award_many([AwardCommand("bob", "w2", 7, 1, 1, 1)], LADDER)
    projection.catch_up()  # quarantines ghost's events, applies bob's
    assert ReadModels(db).quarantined_count() == left

    found = cli(settings, "doctor", "--json")
    assert found.exit_code == 1
    report = json.loads(found.stdout)["found"]
    assert [o["member_id"] for o in report["orphan_streams"]] == [str(Member.create_id("ghost"))]
    assert report["orphan_streams"][0]["first_version"] == 2
    assert report["quarantined"] == left
    assert report["balances_without_stream"] == ["carol"]

    status = cli(settings, "projections", "status", "--json")
    assert status.exit_code == 0
    assert json.loads(status.stdout)["quarantined_events"] == left

    repaired = cli(settings, "doctor", "--repair")
    assert repaired.exit_code == 0, repaired.output
    assert "healthy" in repaired.output
    again = json.loads(cli(settings, "doctor", "--json").stdout)["found"]
    assert again["healthy"] is True and again["quarantined"] == 0
    balances = {r[0]: r[2] for r in ReadModels(db).snapshot()["member_balances"]}
    assert balances == {"alice": 10, "bob": 17}
    # the projection keeps moving, and a fresh ghost account is an ordinary account
    accounts = Accounts(members)
    accounts.award_many([AwardCommand("ghost", "w3", 4, 1, 1, 1)], LADDER)
    projection.catch_up()
    assert ReadModels(db).quarantined_count() == 0
    assert accounts.get("ghost").currency == 4
    assert cli(settings, "doctor").exit_code == 0
