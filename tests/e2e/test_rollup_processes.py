"""Daily rollups across `kill -9` of real worker processes (issue 18): the worker runs
the pipeline and the read models; killed 12 times while batches flow, then drained, the
rollups equal the sums over the ingress events and the account events exactly (a window,
or a projected event, counted once)."""

from __future__ import annotations

import os
import random
import signal
import time
from datetime import timedelta

import pytest

from loyalty.adapters.db import Database
from loyalty.adapters.event_store import event_store_env
from loyalty.adapters.read_models import ReadModels
from loyalty.adapters.rollup_store import RollupStore
from loyalty.application.accounts import Members
from loyalty.application.projections import PROJECTION_NAME
from loyalty.application.reporting import daily_report
from loyalty.config import Settings
from loyalty.domain.member import Member, account_events
from tests.e2e.test_pending_processes import purchases
from tests.e2e.test_worker_processes import (
    NOW,
    ingester,
    wait_until_drained,
    wait_until_recorded,
    worker,
)
from tests.integration.test_rollups import by_key, expected_activity

pytestmark = pytest.mark.slow


def test_kill_9_while_batches_flow_leaves_the_rollups_exact(settings: Settings) -> None:
    events = purchases(6_000, 30, seed=18, prefix="k")
    service = ingester(settings)
    rnd = random.Random(18)
    kills, sent = 0, 0
    while kills < 12 or sent < len(events):
        with worker(settings, interval="0.3") as proc:
            deadline = time.monotonic() + rnd.uniform(0.8, 1.8)
            while time.monotonic() < deadline:
                if sent < len(events):
                    service.ingest("src", events[sent : sent + 250])
                    sent += 250
                time.sleep(0.02)
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            kills += 1
    db = Database(settings)
    app = Members(env=event_store_env(settings))
    try:
        with worker(settings):
            wait_until_drained(settings, len(events))
            # the worker records the weighed earnings after its drain: until then the
            # accounts' head moves on, and a projection caught up with an older head
            # would be compared with balances read later
            wait_until_recorded(settings)
            deadline = time.monotonic() + 60
            while True:
                head = int(app.recorder.max_notification_id() or 0)
                position = ReadModels(db).position(PROJECTION_NAME)
                if position >= head:
                    break
                assert time.monotonic() < deadline, f"projection at {position} of {head}"
                time.sleep(0.2)
        first = (NOW - timedelta(days=3)).date()
        days = daily_report(RollupStore(db), first, NOW.date())
        want = expected_activity({"src": events}, [("src", e) for e in events])
        got = by_key(days)
        assert {k: v[:4] for k, v in got.items()} == {k: v[:4] for k, v in want.items()}
        users = sorted({e.user_id for e in events})
        accounts = [app.repository.get(Member.create_id(u)) for u in users]
        stream = [
            e
            for u in users
            for stored in app.events.get(Member.create_id(u))
            for e in account_events(stored)  # an Enrolled: Created, Awarded, ...
        ]
        assert days[-1].outstanding_currency == sum(m.currency for m in accounts)
        assert days[-1].members == len(users)
        credited = sum(e.currency for e in stream if type(e).__name__ == "Awarded")
        assert sum(d.changes.currency_credited for d in days) == credited
    finally:
        app.close()
        db.dispose()
