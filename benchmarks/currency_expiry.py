"""``currency_expiry``: the expiry job over N members with a lot due, against a bare pass
over the same accounts, and spend latency while it runs — on PostgreSQL, in a database
of its own.

Data: N members, each one ``Awarded`` of 10 currency in lot 2024-01 (saved through the
Members application, 200 members per save) and its row in the expiry index; M more
members, funded and with nothing due, for the spends. Rules: ``currency_expiry
{"after_months": 1, "effective_from": "2024-01"}``; the run is ``as of 2025-01-01``.

- bare pass (baseline): load every due member's aggregate in the job's order, 500 per
  read as the job pages, nothing else — the least any per-member job must do.
- ours: ``loyalty expiry run --as-of`` in its own process (the report's ``seconds``, the
  interpreter start excluded): index page, load, pending, expire, save (100 members per
  transaction), index delete. Alone, as the bare pass runs: the ratio.
- spend p99: 4 threads spending 1 from the funded members through ``Spending`` (as the
  API does) for a fixed time with nothing else running, then again during an expiry run
  over a second database set up the same way (``expiry_s_beside_spends``). Until
  2026-12-05 the ratio's run was this one: the job shared the event store's table lock
  and the 2 cores with the spends, the bare pass with nothing (0.18 at full size).

1M members would take about an hour to set up here (2 cores shared); N is 20k (quick) /
100k (full) and the note extrapolates linearly (the job reads the index by key and
touches each member once, so its cost is linear in the due members).
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from typing import Any

import sqlalchemy as sa

from benchmarks.framework import Context, Result, benchmark
from loyalty.adapters.db import Database
from loyalty.adapters.event_store import event_store_env, stream_loader, worker_env
from loyalty.adapters.pending_store import PendingTable
from loyalty.adapters.rules_store import RulesStore
from loyalty.application.accounts import Accounts, Members, Spending
from loyalty.application.commands.rules import parse_rule_set
from loyalty.config import Settings
from loyalty.domain.member import Member
from loyalty.domain.rules import DEFAULT_RULES_WIRE

AS_OF = "2025-01-01T00:00:00Z"
LADDER = parse_rule_set(copy.deepcopy(DEFAULT_RULES_WIRE), 1).ranks
SPENDERS = 4


def _setup(url: str, n: int, funded: int) -> None:
    settings = Settings(database_url=url)
    db = Database(settings)
    app = Members(env={**event_store_env(settings), "SNAPSHOT_INTERVAL": "0"})
    try:
        wire = copy.deepcopy(DEFAULT_RULES_WIRE)
        wire["currency_expiry"] = {"after_months": 1, "effective_from": "2024-01"}
        RulesStore(db).put(wire)
        batch: list[Member] = []
        for i in range(n + funded):
            due = i < n
            member = Member(user_id=f"u{i}" if due else f"s{i - n}")
            member.award(
                "a",
                10 if due else 1_000_000,
                0,
                1,
                1,
                LADDER,
                month="2024-01" if due else "2024-12",
            )
            batch.append(member)
            if len(batch) == 200:
                app.save(*batch)
                batch = []
        if batch:
            app.save(*batch)
        with db.write() as conn:
            conn.execute(
                sa.text(
                    "INSERT INTO member_lots (user_id, lot) "
                    "SELECT 'u' || g, '2024-01' FROM generate_series(0, :last) AS g"
                ),
                {"last": n - 1},
            )
            conn.execute(sa.text("ANALYZE member_lots"))
    finally:
        app.close()
        db.dispose()


def _bare_pass(url: str, n: int) -> float:
    settings = Settings(database_url=url)
    app = Members(env=worker_env(settings))
    accounts = Accounts(
        app,
        lambda a: stream_loader(a.recorder, a.snapshots.recorder if a.snapshots else None),
    )
    db = Database(settings)
    try:
        with db.read() as conn:
            users = [
                r[0]
                for r in conn.execute(
                    sa.text("SELECT user_id FROM member_lots ORDER BY lot, user_id")
                )
            ]
        started = time.perf_counter()
        for start in range(0, len(users), 500):  # as the job pages: one read per page
            page = users[start : start + 500]
            accounts.prefetch(page)
            for user in page:
                accounts.get(user)
        return time.perf_counter() - started
    finally:
        app.close()
        db.dispose()


def _spends(url: str, funded: int, stop: threading.Event) -> list[float]:
    settings = Settings(database_url=url)
    db = Database(settings)
    app = Members(env=event_store_env(settings))
    spending = Spending(Accounts(app, pending=PendingTable(db)))
    latencies: list[float] = []
    lock = threading.Lock()

    def spender(k: int) -> None:
        i = k
        while not stop.is_set():
            started = time.perf_counter()
            spending.spend(f"s{i % funded}", f"o-{k}-{i}-{time.monotonic_ns()}", 1)
            with lock:
                latencies.append((time.perf_counter() - started) * 1000)
            i += SPENDERS

    threads = [threading.Thread(target=spender, args=(k,)) for k in range(SPENDERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    app.close()
    db.dispose()
    return latencies


def _expiry_run(url: str, n: int) -> float:
    """``loyalty expiry run`` in its own process; the report's seconds (start-up excluded)."""
    done = subprocess.run(
        [sys.executable, "-m", "loyalty.cli", "expiry", "run", "--as-of", AS_OF, "--json"],
        env={
            **{k: v for k, v in os.environ.items() if not k.startswith("LOYALTY_")},
            "LOYALTY_DATABASE_URL": url,
        },
        capture_output=True,
        text=True,
        timeout=7200,
    )
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    report: dict[str, Any] = json.loads(done.stdout)
    if report["lots_expired"] != n:
        raise RuntimeError(f"expired {report['lots_expired']} of {n} lots")
    return float(report["seconds"])


def _p(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return statistics.quantiles(values, n=1000)[int(q * 1000) - 1] if len(values) > 1 else values[0]


@benchmark("currency_expiry", order=95)
def currency_expiry(ctx: Context) -> Result:
    """loyalty expiry run over N members with a lot due, vs a bare load of each; spend p99."""
    n = ctx.pick(smoke=200, quick=20_000, full=100_000)
    funded = ctx.pick(smoke=50, quick=1_000, full=1_000)
    url = ctx.new_pg_database("currency_expiry")
    t0 = time.perf_counter()
    _setup(url, n, funded)
    setup_s = time.perf_counter() - t0
    bare_s = _bare_pass(url, n)

    # spends alone, for as long as the expiry run will roughly take (at least 5 s)
    quiet_stop = threading.Event()
    quiet: list[list[float]] = []
    runner = threading.Thread(target=lambda: quiet.append(_spends(url, funded, quiet_stop)))
    runner.start()
    time.sleep(ctx.pick(smoke=0.5, quick=5.0, full=5.0))
    quiet_stop.set()
    runner.join()

    ours_s = _expiry_run(url, n)  # alone, like the bare pass

    beside = ctx.new_pg_database("currency_expiry_spends")
    _setup(beside, n, funded)
    busy_stop = threading.Event()
    busy: list[list[float]] = []
    spender = threading.Thread(target=lambda: busy.append(_spends(beside, funded, busy_stop)))
    spender.start()
    try:
        beside_s = _expiry_run(beside, n)
    finally:
        busy_stop.set()
        spender.join()
    return {
        "value": n / ours_s,
        "unit": "members/s",
        "baseline": "bare_pass",
        "baseline_value": n / bare_s,
        "members": n,
        "expiry_s": round(ours_s, 2),
        "bare_pass_s": round(bare_s, 2),
        "ratio_expiry_to_bare": round(ours_s / bare_s, 2),
        "expiry_s_beside_spends": round(beside_s, 2),
        "extrapolated_1m_expiry_min": round(ours_s * 1_000_000 / n / 60, 1),
        "extrapolated_1m_bare_min": round(bare_s * 1_000_000 / n / 60, 1),
        "spends_quiet": len(quiet[0]),
        "spend_p50_ms_quiet": round(_p(quiet[0], 0.5), 2),
        "spend_p99_ms_quiet": round(_p(quiet[0], 0.99), 2),
        "spends_during": len(busy[0]),
        "spend_p50_ms_during": round(_p(busy[0], 0.5), 2),
        "spend_p99_ms_during": round(_p(busy[0], 0.99), 2),
        "setup_s": round(setup_s, 1),
        "note": "N below 1M (set-up time); extrapolated linearly",
    }
