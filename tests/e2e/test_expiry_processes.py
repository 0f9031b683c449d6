"""The expiry job in real processes: ``kill -9`` of ``loyalty expiry run``, and of a
``loyalty worker`` running it periodically, again and again mid-run, then one run to the
end: every lot expired exactly once (one ``CurrencyExpired`` per member and lot, for
exactly what was in it)."""

from __future__ import annotations

import copy
import random
import signal
import subprocess
import time
from collections.abc import Callable

import pytest
import sqlalchemy as sa

from loyalty.adapters.db import Database
from loyalty.adapters.event_store import event_store_env
from loyalty.adapters.rules_store import RulesStore
from loyalty.application.accounts import Members
from loyalty.application.commands.rules import parse_rule_set
from loyalty.bootstrap import build_projection
from loyalty.config import Settings
from loyalty.domain.member import Member
from loyalty.domain.rules import DEFAULT_RULES_WIRE
from tests.e2e.live import LOYALTY, env_for

pytestmark = pytest.mark.slow
LADDER = parse_rule_set(copy.deepcopy(DEFAULT_RULES_WIRE), 1).ranks
MEMBERS = 1500
AS_OF = "2025-06-01T00:00:00Z"


def amounts(i: int) -> dict[str, int]:
    """Member i's lots: two due months (January and March 2024), one not due yet."""
    return {"2024-01": 10 + i % 7, "2024-03": 3 + i % 5, "2025-05": 1}


def head(settings: Settings, app: Members | None = None) -> int:
    """The newest notification id: how many account events are stored (through ``app``
    when given: polling with one open store reads within milliseconds, where opening one
    per poll took long enough on a loaded machine for a short run to end unseen)."""
    if app is not None:
        return int(app.recorder.max_notification_id() or 0)
    app = Members(env=event_store_env(settings))
    try:
        return int(app.recorder.max_notification_id() or 0)
    finally:
        app.close()


def accounts_with_lots(
    settings: Settings, db: Database, lots: Callable[[int], dict[str, int]]
) -> None:
    """MEMBERS accounts with ``lots(i)``, rules that expire a lot a month after it (from
    2024-01), and the expiry index caught up."""
    wire = copy.deepcopy(DEFAULT_RULES_WIRE)
    wire["currency_expiry"] = {"after_months": 1, "effective_from": "2024-01"}
    RulesStore(db).put(wire)
    app = Members(env=event_store_env(settings))
    try:
        batch = []
        for i in range(MEMBERS):
            member = Member(user_id=f"m{i}")
            for month, amount in lots(i).items():
                member.award(f"a-{month}", amount, 0, 1, 1, LADDER, month=month)
            batch.append(member)
            if len(batch) == 200:
                app.save(*batch)
                batch = []
        app.save(*batch)
        build_projection(db, app).catch_up()
    finally:
        app.close()


def expiries(settings: Settings, db: Database) -> dict[tuple[str, str], tuple[int, int]]:
    """(user, lot) -> (CurrencyExpired events, amount), read through the projection."""
    app = Members(env=event_store_env(settings))
    try:
        build_projection(db, app).catch_up()
    finally:
        app.close()
    with db.read() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT user_id, ref, count(*), sum(currency) FROM member_history "
                "WHERE kind = 'expiry' GROUP BY user_id, ref"
            )
        ).all()
    return {(user, lot): (int(n), -int(total)) for user, lot, n, total in rows}


def test_kill_9_during_an_expiry_run_expires_each_lot_exactly_once(
    settings: Settings, db: Database
) -> None:
    accounts_with_lots(settings, db, amounts)

    start = head(settings)
    rnd = random.Random(19)
    kills = 0
    left: list[int] = []
    watch = Members(env=event_store_env(settings))
    for _ in range(8):
        proc = subprocess.Popen(
            [*LOYALTY, "expiry", "run", "--as-of", AS_OF, "--json"],
            env=env_for(settings.database_url),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        # killed soon after the run's first expiry commits (start-up takes 1 s on a quiet
        # machine, several on a loaded one; a fixed sleep missed the run on either)
        before, deadline = head(settings, watch), time.monotonic() + 30
        while proc.poll() is None and time.monotonic() < deadline:
            if head(settings, watch) > before:
                time.sleep(rnd.uniform(0.0, 0.1))
                break
            time.sleep(0.005)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait(timeout=30)
        left.append(head(settings, watch) - start)
    watch.close()
    final = subprocess.run(
        [*LOYALTY, "expiry", "run", "--as-of", AS_OF, "--json"],
        env=env_for(settings.database_url),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert final.returncode == 0, final.stderr
    assert kills >= 3, "the runs ended before they could be killed: make them longer"
    # kills landed mid-run: some expiries stored, the rest left for the next run
    assert any(0 < n < 2 * MEMBERS for n in left), left

    found = expiries(settings, db)
    with db.read() as conn:
        balances = dict(
            conn.execute(sa.text("SELECT user_id, currency FROM member_balances")).all()
        )
    wanted = {
        (f"m{i}", month): (1, amount)
        for i in range(MEMBERS)
        for month, amount in amounts(i).items()
        if month != "2025-05"
    }
    assert found == wanted  # each due lot exactly once, for all it held; nothing else
    assert all(balances[f"m{i}"] == 1 for i in range(MEMBERS))  # May 2025 is not due


def test_kill_9_of_the_worker_during_its_expiry_run(settings: Settings, db: Database) -> None:
    """The worker's periodic job (on the real clock: every 2024 lot is long due)."""

    def lots(i: int) -> dict[str, int]:
        return {"2024-02": 4 + i % 3}

    accounts_with_lots(settings, db, lots)
    start = head(settings)
    env = env_for(settings.database_url, LOYALTY_EXPIRY_INTERVAL_SECONDS="0.5")
    rnd = random.Random(91)
    progress: list[int] = []
    for _ in range(6):
        proc = subprocess.Popen(
            [*LOYALTY, "worker", "--no-webhooks"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        # killed soon after its run's first expiry commits (a fixed sleep missed the run
        # on a fast or a loaded machine), as the expiry run above
        before, deadline = head(settings), time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            if head(settings) > before:
                time.sleep(rnd.uniform(0.0, 0.3))
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the worker exited"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        progress.append(head(settings) - start)
        if progress[-1] >= MEMBERS:
            break
    assert any(0 < n < MEMBERS for n in progress), progress  # killed mid-run
    done = subprocess.run(
        [*LOYALTY, "expiry", "run", "--json"],
        env=env_for(settings.database_url),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    assert expiries(settings, db) == {
        (f"m{i}", "2024-02"): (1, amount) for i in range(MEMBERS) for amount in lots(i).values()
    }
