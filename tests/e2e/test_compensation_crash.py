"""``loyalty rules apply --compensate`` killed with SIGKILL mid-run, then run again:
every member compensated exactly once; a third run changes nothing (issue 20)."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import sqlalchemy as sa

from loyalty.adapters.db import Database
from loyalty.adapters.event_store import event_store_env
from loyalty.adapters.ingress_log import create_ingress_log
from loyalty.application.accounts import Members
from loyalty.application.ingress import IncomingEvent, IngestService
from loyalty.config import Settings
from loyalty.domain.member import Member
from loyalty.domain.rules import DEFAULT_RULES_WIRE
from tests.conftest import drain_pipeline
from tests.e2e.live import LOYALTY, cli, env_for

MEMBERS = 300
"""Enough for the kill to land mid-run (the run commits member by member and is killed
at the 50th explanation; a run that ended first fails the test): 1,500 took this test
past pytest-timeout's 300 s on postgresql on 2 cores under xdist."""


def balances(members: Members, users: list[str]) -> dict[str, int]:
    return {u: members.repository.get(Member.create_id(u)).currency for u in users}


def compensations(members: Members, user: str) -> list[int]:
    return [
        e.currency
        for e in members.events.get(Member.create_id(user))
        if type(e).__name__ == "Adjusted" and e.adjustment_id == "rules-v2"
    ]


def test_compensation_killed_mid_run_is_exactly_once(
    settings: Settings, db: Database, tmp_path: Path
) -> None:
    url = settings.database_url
    yesterday = datetime.now(UTC).replace(microsecond=0) - timedelta(days=1)
    users = [f"c{i:04d}" for i in range(MEMBERS)]
    events = [IncomingEvent(f"l{i}", u, "logged_on", yesterday, "{}") for i, u in enumerate(users)]
    events += [
        IncomingEvent(f"p{i}", u, "made_purchase", yesterday, "{}")
        for i, u in enumerate(users)
        if i % 2 == 0
    ]
    service = IngestService(
        create_ingress_log(db),
        clock=lambda: datetime.now(UTC),
        retention=timedelta(days=7),
        future_skew=timedelta(minutes=5),
        shard_count=settings.shard_count,
    )
    for i in range(0, len(events), 1000):
        service.ingest("src", events[i : i + 1000])
    members = Members(env=event_store_env(settings))
    try:
        drain_pipeline(db, members)
        before = balances(members, users)
        # logged_on: 1 -> 0 currency (members without a purchase go to 0: all they have);
        # made_purchase: 10 -> 13
        wire = copy.deepcopy(DEFAULT_RULES_WIRE)
        wire["rules"][0]["currency"] = 0
        wire["rules"][3]["currency"] = 13
        rules = tmp_path / "rules.json"
        rules.write_text(json.dumps(wire))
        args = ["rules", "apply", str(rules), "--since", yesterday.isoformat(), "--compensate"]
        proc = subprocess.Popen(
            [*LOYALTY, *args],
            env=env_for(url),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        done = 0
        deadline = time.monotonic() + 120
        count = sa.text("SELECT count(*) FROM award_explanations WHERE kind = 'compensation'")
        while time.monotonic() < deadline and proc.poll() is None:
            with db.read() as conn:
                done = int(conn.execute(count).scalar_one())
            if done >= 50:
                break
            time.sleep(0.01)
        assert proc.poll() is None, "the run ended before the kill"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        assert 0 < done < MEMBERS, f"not killed mid-run ({done} done)"
        with db.read() as conn:
            state = conn.execute(sa.text("SELECT state FROM rule_compensations")).scalar_one()
        assert state == "running"
        second = cli(url, *args)
        assert second.returncode == 0, second.stderr
        receipt = json.loads(second.stdout)
        assert receipt["already_done"] is False
        assert receipt["members_compensated"] == MEMBERS
        assert receipt["replayed"] >= done and receipt["applied_now"] <= MEMBERS - done
        assert receipt["shortfall_members"] == 0  # the balance covers every deduction here
        after = Members(env=event_store_env(settings))
        try:
            for i, u in enumerate(users):
                want = 3 - 1 if i % 2 == 0 else -1
                assert compensations(after, u) == [want], u
            assert balances(after, users) == {
                u: before[u] + (2 if i % 2 == 0 else -1) for i, u in enumerate(users)
            }
            third = cli(url, *args)
            assert third.returncode == 0, third.stderr
            assert json.loads(third.stdout)["already_done"] is True
            assert balances(after, users) == {
                u: before[u] + (2 if i % 2 == 0 else -1) for i, u in enumerate(users)
            }
        finally:
            after.close()
    finally:
        members.close()
