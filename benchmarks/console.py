"""``console_dashboard``: what one open console dashboard costs the database, per poll
(every 5 s), on PostgreSQL with many members and a long statement history.

Baseline: ``GET /v1/pipeline`` in the same run (the live part of the dashboard). Value: a
poll of ``/console/dashboard/live`` with the costly figures cached (the default, 30 s);
also reported: a poll that recomputes them (today's totals, outstanding currency, the
storage report), which is what every poll would cost without the cache."""

from __future__ import annotations

import re
import statistics
import time
from typing import Any

import psycopg
from fastapi.testclient import TestClient

from benchmarks.framework import Context, Result, benchmark
from loyalty.adapters.db import Database
from loyalty.adapters.keys import KeyStore
from loyalty.api.app import create_app
from loyalty.application.access import Role
from loyalty.config import Settings


def _fill(url: str, members: int, history: int) -> None:
    """``members`` balance rows and ``history`` statement rows, today and before."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO member_balances (user_id, member_id, currency, rank_points, "
            "lifetime_currency, updated_at) SELECT 'u' || i, gen_random_uuid(), i %% 1000, "
            "i %% 5000, i %% 1000, now() FROM generate_series(1, %s) i",
            (members,),
        )
        conn.execute(
            "INSERT INTO member_history (user_id, position, kind, currency, rank_points, at, "
            "ref) SELECT 'u' || (i %% %s + 1), i, CASE WHEN i %% 3 = 0 THEN 'spend' ELSE "
            "'award' END, CASE WHEN i %% 3 = 0 THEN -5 ELSE 10 END, 1, "
            "now() - (i %% 30) * interval '1 day', 'r' || i FROM generate_series(1, %s) i",
            (members, history),
        )
        conn.execute("ANALYZE")


def _times(client: TestClient, path: str, n: int, **kwargs: Any) -> list[float]:
    out = []
    for _ in range(n):
        started = time.perf_counter()
        answer = client.get(path, **kwargs)
        out.append((time.perf_counter() - started) * 1000)
        assert answer.status_code == 200, answer.text[:200]
    return out


@benchmark("console_dashboard", order=95)
def console_dashboard(ctx: Context) -> Result:
    """A console dashboard poll (figures cached) vs GET /v1/pipeline, PostgreSQL."""
    members = ctx.pick(smoke=500, quick=50_000, full=500_000)
    history = ctx.pick(smoke=5_000, quick=500_000, full=5_000_000)
    polls = ctx.pick(smoke=3, quick=30, full=100)
    url = ctx.new_pg_database("console")
    _fill(url, members, history)
    measured: dict[str, list[float]] = {}
    for label, ttl in (("cached", 30.0), ("uncached", 0.0)):
        settings = Settings(database_url=url, console_figures_seconds=ttl, db_pool_size=2)
        db = Database(settings)
        key = KeyStore(db).create(Role.OPERATOR, f"bench-{label}")
        try:
            with TestClient(create_app(settings, db=db)) as client:
                form = client.get("/console/sign-in").text
                token = re.search(r'name="csrf" value="([^"]+)"', form)
                assert token is not None
                client.post("/console/sign-in", data={"csrf": token.group(1), "key": key})
                client.get("/console/dashboard/live")  # warm up (and fill the cache)
                measured[label] = _times(client, "/console/dashboard/live", polls)
                if label == "cached":
                    auth = {"Authorization": f"Bearer {key}"}
                    client.get("/v1/pipeline", headers=auth)
                    measured["pipeline"] = _times(client, "/v1/pipeline", polls, headers=auth)
        finally:
            db.dispose()
    median = {k: statistics.median(v) for k, v in measured.items()}
    return {
        "value": median["cached"],
        "unit": "ms per poll (median)",
        "baseline": "GET /v1/pipeline",
        "baseline_value": median["pipeline"],
        "lower_is_better": True,
        "uncached_ms": round(median["uncached"], 2),
        "uncached_ratio": round(median["uncached"] / median["pipeline"], 2),
        "members": members,
        "history_rows": history,
        "note": (
            "value: /console/dashboard/live with today's totals, outstanding currency and "
            "storage cached for 30 s; uncached: the same poll recomputing them each time"
        ),
    }
