"""Pending earnings with real worker processes (issue 16): kill -9 while batches flow and
spends of pending currency run concurrently; the same stream at two rates."""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from datetime import timedelta

import pytest
import sqlalchemy as sa

from loyalty.adapters.db import Database
from loyalty.adapters.event_store import event_store_env
from loyalty.adapters.pending_store import PendingTable
from loyalty.adapters.tables import pipeline_checkpoints
from loyalty.application.accounts import Accounts, Members, Spending
from loyalty.application.commands.rules import parse_rule_set
from loyalty.application.ingress import IncomingEvent
from loyalty.config import Settings
from loyalty.domain.errors import InsufficientFunds, MemberNotFound
from loyalty.domain.member import Member
from loyalty.domain.rules import DEFAULT_RULES_WIRE
from tests.e2e.test_worker_processes import (
    NOW,
    expected,
    ingester,
    wait_until_drained,
    worker,
)

pytestmark = pytest.mark.slow
LADDER = parse_rule_set(DEFAULT_RULES_WIRE, 1).ranks


def purchases(n: int, users: int, seed: int, prefix: str = "p") -> list[IncomingEvent]:
    """Fractional earnings: premium purchases are worth 7.5 rank points."""
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        kind = rnd.choice(["made_purchase", "made_purchase", "played_game", "logged_on"])
        attrs = '{"tier": "premium"}' if rnd.random() < 0.7 else "{}"
        out.append(
            IncomingEvent(
                f"{prefix}{i}",
                f"{prefix}-user-{rnd.randrange(users)}",
                kind,
                NOW - timedelta(hours=rnd.randrange(30)),
                attrs,
            )
        )
    return out


def processed(db: Database) -> int:
    """Events the pipeline has committed, over all shards."""
    c = pipeline_checkpoints.c
    with db.read() as conn:
        return int(
            conn.execute(
                sa.select(sa.func.coalesce(sa.func.sum(c.processed_total), 0))
            ).scalar_one()
        )


def recorded(settings: Settings, users: list[str]) -> dict[str, tuple[int, int]]:
    app = Members(env=event_store_env(settings))
    try:
        out = {}
        for user in users:
            m: Member = app.repository.get(Member.create_id(user))
            out[user] = (m.currency, m.rank_points)
        return out
    finally:
        app.close()


def test_kill_9_while_batches_flow_and_pending_currency_is_spent(settings: Settings) -> None:
    events = purchases(8_000, 40, seed=5)
    users = sorted({e.user_id for e in events})
    service = ingester(settings)
    app = Members(env=event_store_env(settings))
    db = Database(settings)
    spending = Spending(Accounts(app, pending=PendingTable(db)), ranks=lambda: LADDER)
    spent: dict[str, int] = dict.fromkeys(users, 0)
    stop = threading.Event()
    errors: list[BaseException] = []

    def spender() -> None:
        rnd = random.Random(3)
        n = 0
        while not stop.is_set():
            user = rnd.choice(users)
            amount = rnd.randint(1, 40)
            n += 1
            try:
                result = spending.spend(user, f"o{n}", amount)
                spent[user] += amount
                assert result.currency >= 0
            except (InsufficientFunds, MemberNotFound):
                pass
            except BaseException as exc:  # reported by the test, not swallowed
                errors.append(exc)
                return
            time.sleep(0.005)

    thread = threading.Thread(target=spender)
    thread.start()
    rnd = random.Random(11)
    kills, sent = 0, 0
    try:
        while kills < 20 or sent < len(events):
            # a short interval: recordings, pending growth and spends interleave
            with worker(settings, interval="0.3") as proc:
                # killed at a random moment after the worker has committed a window (a
                # worker starting on a loaded machine can take seconds before its first)
                before, progressed = processed(db), False
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:
                    if sent < len(events):
                        service.ingest("src", events[sent : sent + 300])
                        sent += 300
                    time.sleep(0.02)
                    done = processed(db)
                    if not progressed and (done > before or done >= len(events)):
                        progressed = True
                        deadline = time.monotonic() + rnd.uniform(0.0, 1.0)
                assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                kills += 1
    finally:
        stop.set()
        thread.join()
        app.close()
    assert not errors, errors
    assert sum(spent.values()) > 0  # pending currency was spent while windows ran
    with worker(settings):  # interval 0: everything recorded after the drain
        wait_until_drained(settings, len(events))
        deadline = time.monotonic() + 30
        while PendingTable(db).count() and time.monotonic() < deadline:
            time.sleep(0.1)
    assert PendingTable(db).count() == 0
    db.dispose()
    want = expected(events)
    got = recorded(settings, sorted(want))
    assert {u: (c + spent[u], r) for u, (c, r) in got.items()} == want


def test_the_same_stream_at_two_rates_gives_the_same_balances(settings: Settings) -> None:
    """One copy of a stream sent at once (a few big windows), the other trickled in
    (many small windows, recordings in between): identical balances per member."""
    fast = purchases(3_000, 30, seed=9, prefix="f")
    slow = [
        IncomingEvent(
            "s" + e.event_id[1:], "s" + e.user_id[1:], e.type, e.occurred_at, e.attributes_json
        )
        for e in fast
    ]
    service = ingester(settings)
    with worker(settings, interval="0.2"):
        service.ingest("src", fast[:1500])
        service.ingest("src", fast[1500:])
        for i in range(0, len(slow), 60):
            service.ingest("src", slow[i : i + 60])
            time.sleep(0.03)
        wait_until_drained(settings, len(fast) + len(slow))
        db = Database(settings)
        deadline = time.monotonic() + 30
        while PendingTable(db).count() and time.monotonic() < deadline:
            time.sleep(0.1)
        db.dispose()
    users = sorted({e.user_id[2:] for e in fast})
    a = recorded(settings, [f"f-{u}" for u in users])
    b = recorded(settings, [f"s-{u}" for u in users])
    assert [a[f"f-{u}"] for u in users] == [b[f"s-{u}"] for u in users]
    want = expected(fast)
    assert a == want
