"""Compensation where it meets the live pipeline, forget-me and later rules changes
(issue 25, items 1-3), with real processes on both backends:

1. a stalled worker (``kill -STOP`` of the pipeline process, more events, ``rules apply
   --compensate``, ``kill -CONT``): each event ends up weighed under the new rules once;
   the same under a steady flow with a healthy worker;
2. a member forgotten while a compensation runs stays forgotten (404, no explanation);
3. a compensation killed with ``kill -9`` is listed by ``loyalty doctor`` and finished by
   the next apply after another rules change, or abandoned with a receipt.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from eventsourcing.application import AggregateNotFoundError
from fastapi.testclient import TestClient

from loyalty.adapters.db import Database
from loyalty.adapters.event_store import event_store_env
from loyalty.adapters.ingress_log import create_ingress_log
from loyalty.adapters.pending_store import PendingTable
from loyalty.adapters.rules_store import RulesStore
from loyalty.application.accounts import Members
from loyalty.application.ingress import IncomingEvent, IngestService
from loyalty.bootstrap import build_forget_service
from loyalty.config import Settings
from loyalty.domain.member import Member
from loyalty.domain.rules import DEFAULT_RULES_WIRE
from tests.conftest import drain_pipeline
from tests.e2e.live import LOYALTY, cli, env_for
from tests.e2e.test_worker_processes import wait_until_drained, worker

pytestmark = pytest.mark.slow
PURCHASE = 3  # index of made_purchase in DEFAULT_RULES_WIRE["rules"]


def doubled_purchases(tmp_path: Path) -> tuple[dict[str, Any], Path]:
    """made_purchase 10 -> 20 currency, 5 -> 10 rank points (integral: no rounding)."""
    wire = copy.deepcopy(DEFAULT_RULES_WIRE)
    wire["rules"][PURCHASE]["currency"] = 20
    wire["rules"][PURCHASE]["rank_points"] = 10
    path = tmp_path / "doubled.json"
    path.write_text(json.dumps(wire))
    return wire, path


def ingester(db: Database) -> Callable[[list[IncomingEvent]], None]:
    service = IngestService(
        create_ingress_log(db),
        clock=lambda: datetime.now(UTC),
        retention=timedelta(days=7),
        future_skew=timedelta(minutes=5),
        shard_count=db.settings.shard_count,
    )

    def ingest(events: list[IncomingEvent]) -> None:
        for i in range(0, len(events), 1000):
            service.ingest("src", events[i : i + 1000])

    return ingest


def purchases(users: list[str], per_member: int, at: datetime, tag: str) -> list[IncomingEvent]:
    return [
        IncomingEvent(f"{tag}-{u}-{i}", u, "made_purchase", at, "{}")
        for u in users
        for i in range(per_member)
    ]


def balances(settings: Settings, users: list[str]) -> dict[str, tuple[int, int]]:
    app = Members(env=event_store_env(settings))
    try:
        out = {}
        for u in users:
            m = app.repository.get(Member.create_id(u))
            out[u] = (m.currency, m.rank_points)
        return out
    finally:
        app.close()


def adjustments(settings: Settings, users: list[str], adjustment_id: str) -> dict[str, list[int]]:
    """Each member's adjustments ``adjustment_id`` (currency), read by one application
    (one per member cost 1,500 engines and connections per check)."""
    app = Members(env=event_store_env(settings))
    try:
        return {
            user: [
                e.currency
                for e in app.events.get(Member.create_id(user))
                if type(e).__name__ == "Adjusted" and e.adjustment_id == adjustment_id
            ]
            for user in users
        }
    finally:
        app.close()


def wait_idle(db: Database, timeout: float = 60) -> None:
    """Until the worker has recorded every pending row (it then only reads)."""
    pending = PendingTable(db)
    deadline = time.monotonic() + timeout
    while pending.count():
        assert time.monotonic() < deadline, "pending rows not recorded"
        time.sleep(0.05)
    time.sleep(0.5)


def record_everything(db: Database) -> None:
    members = Members(env=event_store_env(db.settings))
    try:
        drain_pipeline(db, members)
    finally:
        members.close()


def apply_args(path: Path, since: datetime) -> list[str]:
    return ["rules", "apply", str(path), "--since", since.isoformat(), "--compensate"]


# ------------------------------------------------------------------ 1. what was weighed


def test_stalled_worker_events_are_not_compensated_twice(
    settings: Settings, db: Database, tmp_path: Path
) -> None:
    """kill -STOP of the pipeline process, 10 more purchases per member, apply with
    purchases doubled, kill -CONT: every member holds 20 purchases under the new rules
    (today's code: the 10 the worker weighs under the new rules after -CONT were also
    compensated: 6/6 members at 500 instead of 400)."""
    users = [f"stall-{i}" for i in range(6)]
    since = datetime.now(UTC) - timedelta(hours=1)
    ingest = ingester(db)
    ingest(purchases(users, 10, since, "a"))
    _, path = doubled_purchases(tmp_path)
    with worker(settings) as proc:
        wait_until_drained(settings, 60)
        wait_idle(db)
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            ingest(purchases(users, 10, since + timedelta(minutes=1), "b"))
            applied = cli(settings.database_url, *apply_args(path, since))
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        assert applied.returncode == 0, applied.stderr
        wait_until_drained(settings, 120)
    record_everything(db)
    got = balances(settings, users)
    wrong = {u: b for u, b in got.items() if b != (400, 200)}
    assert not wrong, f"{len(wrong)}/{len(users)} members not at (400, 200): {wrong}"
    assert json.loads(applied.stdout)["events"] == 60  # only what the old rules weighed


def test_steady_flow_each_event_weighed_under_the_new_rules_once(
    settings: Settings, db: Database, tmp_path: Path
) -> None:
    """A healthy worker, purchases flowing for 10 members, apply in the middle: every
    member holds all its purchases under the new rules, exactly (today's code: events
    the worker weighed late, or under its cached rules, were compensated twice or not)."""
    users = [f"flow-{i}" for i in range(10)]
    since = datetime.now(UTC) - timedelta(hours=1)
    ingest = ingester(db)
    _, path = doubled_purchases(tmp_path)
    sent = dict.fromkeys(users, 0)
    stop = threading.Event()
    errors: list[BaseException] = []

    def flow() -> None:
        n = 0
        try:
            while not stop.is_set():
                ingest(purchases(users, 1, since, f"f{n}"))
                for u in users:
                    sent[u] += 1
                n += 1
                time.sleep(0.02)
        except BaseException as exc:  # reported by the test
            errors.append(exc)

    with worker(settings):
        thread = threading.Thread(target=flow)
        thread.start()
        try:
            time.sleep(3)
            applied = cli(settings.database_url, *apply_args(path, since))
            time.sleep(2)
        finally:
            stop.set()
            thread.join()
        assert not errors, errors
        assert applied.returncode == 0, applied.stderr
        wait_until_drained(settings, sum(sent.values()))
    record_everything(db)
    got = balances(settings, users)
    wrong = {
        u: (got[u], (20 * sent[u], 10 * sent[u]))
        for u in users
        if got[u] != (20 * sent[u], 10 * sent[u])
    }
    assert not wrong, f"{len(wrong)}/{len(users)} members off (got, want): {wrong}"


# ------------------------------------------------------------------ 2. erasure


def test_member_forgotten_during_compensation_stays_forgotten(
    settings: Settings, db: Database, tmp_path: Path, make_key: Callable[..., dict[str, str]]
) -> None:
    """1,500 members sorted before the victim; the victim is forgotten once the first
    compensation exists; after the run the victim is 404 with no explanation (today's
    code: its compensation creates a fresh account from the erased activity: 200)."""
    fillers = [f"a{i:04d}" for i in range(1500)]
    victim = "zz-victim"
    since = datetime.now(UTC) - timedelta(hours=1)
    ingest = ingester(db)
    ingest(purchases(fillers, 1, since, "p") + purchases([victim], 20, since, "v"))
    record_everything(db)
    _, path = doubled_purchases(tmp_path)
    proc = subprocess.Popen(
        [*LOYALTY, *apply_args(path, since)],
        env=env_for(settings.database_url),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    count = sa.text("SELECT count(*) FROM award_explanations WHERE kind = 'compensation'")
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        with db.read() as conn:
            if int(conn.execute(count).scalar_one()) >= 1:
                break
        time.sleep(0.01)
    fast = Database(settings.model_copy(update={"forget_settle_seconds": 0.0}))
    try:
        service = build_forget_service(fast)
        request = service.request(victim)
        while service.status(request.request_id).status != "completed":  # type: ignore[union-attr]
            service.run_pending()
        assert proc.poll() is None, "the run ended before the victim was forgotten"
    finally:
        fast.dispose()
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    from loyalty.api.app import create_app

    with TestClient(create_app(settings, db=db)) as client:
        shop = make_key("shop", "frontend")
        assert client.get(f"/v1/members/{victim}", headers=shop).status_code == 404
        assert client.get(f"/v1/members/{fillers[-1]}", headers=shop).status_code == 200
    receipt = json.loads(out)
    assert receipt["erased_members"] == 1
    assert receipt["members_compensated"] == len(fillers)
    app = Members(env=event_store_env(settings))
    try:
        with pytest.raises(AggregateNotFoundError):
            app.repository.get(Member.create_id(victim))
    finally:
        app.close()
    with db.read() as conn:
        kept = conn.execute(
            sa.text("SELECT count(*) FROM award_explanations WHERE user_id = :u"), {"u": victim}
        ).scalar_one()
    assert kept == 0


# ------------------------------------------------------------------ 3. unfinished runs

MEMBERS = 300
"""Enough for the kill to land mid-run (the run commits member by member; the kill
follows the 20th explanation within a poll, and a run that ended first fails the test):
1,500 made these tests minutes long on 2 cores under xdist (one was past 300 s)."""


def killed_run(
    settings: Settings, db: Database, tmp_path: Path
) -> tuple[list[str], list[str], int]:
    """Members with one purchase each, all recorded; ``rules apply --compensate`` with
    purchases doubled, killed with SIGKILL mid-run. Returns (users, args, done)."""
    users = [f"k{i:04d}" for i in range(MEMBERS)]
    since = datetime.now(UTC) - timedelta(hours=1)
    ingester(db)(purchases(users, 1, since, "k"))
    record_everything(db)
    _, path = doubled_purchases(tmp_path)
    args = apply_args(path, since)
    proc = subprocess.Popen(
        [*LOYALTY, *args],
        env=env_for(settings.database_url),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    count = sa.text("SELECT count(*) FROM award_explanations WHERE kind = 'compensation'")
    done = 0
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        with db.read() as conn:
            done = int(conn.execute(count).scalar_one())
        if done >= 20:
            break
        time.sleep(0.01)
    assert proc.poll() is None, f"the run ended before the kill: {proc.stderr.read()!r}"  # type: ignore[union-attr]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    assert 0 < done < MEMBERS, f"not killed mid-run ({done} done)"
    return users, args, done


def doctor(settings: Settings) -> tuple[int, dict[str, Any]]:
    found = cli(settings.database_url, "doctor", "--json")
    return found.returncode, json.loads(found.stdout)["found"]


def run_states(db: Database) -> dict[int, str]:
    with db.read() as conn:
        rows = conn.execute(sa.text("SELECT new_version, state FROM rule_compensations"))
        return {int(v): s for v, s in rows}


def test_killed_compensation_is_finished_after_a_later_rules_change(
    settings: Settings, db: Database, tmp_path: Path
) -> None:
    """kill -9 mid-run, then another rules version (a plain change), then the same apply
    again: the killed run (v2) is found and finished, every member compensated for it
    exactly once (today's code: the re-run stores v4, compares v3 with v4 and leaves v2
    running forever, most members never compensated for it)."""
    users, args, done = killed_run(settings, db, tmp_path)
    code, found = doctor(settings)
    listed = [r["new_version"] for r in found.get("unfinished_compensations", [])]
    RulesStore(db).put(copy.deepcopy(DEFAULT_RULES_WIRE))  # any rules change: v3
    again = cli(settings.database_url, *args)
    assert again.returncode == 0, again.stderr
    found_v2 = adjustments(settings, users, "rules-v2")
    missing = [u for u in users if found_v2[u] != [10]]
    assert not missing, f"{len(missing)}/{MEMBERS} members without exactly one rules-v2"
    assert run_states(db)[2] == "done"
    assert code == 1 and listed == [2]  # the doctor listed the killed run
    receipt = json.loads(again.stdout)
    resumed = {r["new_version"]: r for r in receipt.get("resumed", [])}
    assert resumed[2]["members_compensated"] == MEMBERS
    assert resumed[2]["replayed"] >= done
    code, found = doctor(settings)
    assert found["unfinished_compensations"] == []


def test_killed_compensation_can_be_abandoned_with_a_receipt(
    settings: Settings, db: Database, tmp_path: Path
) -> None:
    """kill -9 mid-run, then ``rules compensation abandon 2``: a receipt with the members
    compensated before; the run is no longer unfinished; nothing more is applied."""
    users, args, done = killed_run(settings, db, tmp_path)
    listed = cli(settings.database_url, "rules", "compensation", "list")
    assert listed.returncode == 0, listed.stderr
    assert [r["new_version"] for r in json.loads(listed.stdout)] == [2]
    abandoned = cli(settings.database_url, "rules", "compensation", "abandon", "2")
    assert abandoned.returncode == 0, abandoned.stderr
    receipt = json.loads(abandoned.stdout)
    assert receipt["state"] == "abandoned"
    assert receipt["members_compensated_before_abandoned"] >= done
    assert run_states(db)[2] == "abandoned"
    _, found = doctor(settings)
    assert found["unfinished_compensations"] == []
    twice = cli(settings.database_url, "rules", "compensation", "abandon", "2")
    assert twice.returncode == 2
    kept = receipt["members_compensated_before_abandoned"]
    again = cli(settings.database_url, *args)  # the same rules: the abandoned run stands
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["already_done"] is True
    # a kill between a member's adjustment and its explanation leaves one member adjusted
    # and not counted (the receipt says so); never more, and nothing after the abandon
    adjusted = sum(1 for got in adjustments(settings, users, "rules-v2").values() if got)
    assert kept <= adjusted <= kept + receipt["members_maybe_adjusted_without_explanation"]
