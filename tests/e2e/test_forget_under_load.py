"""Forget-me under a mixed load against the real server (``loyalty serve`` with its worker
children), on both backends (issue 13): 16 clients on a few dozen members ingest
batches, spend, adjust, read balances and ask for forget-me, with the settle wait off so
that only the database guards. Afterwards: no 500, no member stream without its first
event, nothing quarantined, and the read models still move."""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from loyalty.adapters.db import Database
from loyalty.config import Settings
from tests.e2e.live import create_key, serve_logged

CLIENTS = 16
# The load is an amount of work, not a duration: the clients stop once REQUESTS answers
# and FORGETS accepted forget-me requests are in (a fixed 10 s made under 300 requests and
# only 3 forget-me requests on this 2-core machine under xdist, failing the counts below);
# DEADLINE fails a server that stops answering.
REQUESTS = 400
FORGETS = 5
DEADLINE = 240.0
MEMBERS = [f"m{i:02d}" for i in range(30)]


def orphan_streams(settings: Settings) -> int:
    """Member streams whose lowest version is not the first (the SQLite tombstone,
    stream id nil, is not a member's)."""
    db = Database(settings)
    pg = db.backend == "postgresql"
    table = "members_events" if pg else "stored_events"
    nil: Any = uuid.UUID(int=0) if pg else uuid.UUID(int=0).hex
    try:
        with db.read() as conn:
            return int(
                conn.execute(
                    sa.text(
                        f"SELECT count(*) FROM (SELECT originator_id FROM {table} "
                        "WHERE originator_id <> :nil GROUP BY originator_id "
                        "HAVING min(originator_version) > 1) x"
                    ),
                    {"nil": nil},
                ).scalar_one()
            )
    finally:
        db.dispose()


@pytest.mark.slow
def test_forget_me_under_mixed_load(settings: Settings) -> None:
    url = settings.database_url
    with serve_logged(
        url, LOYALTY_FORGET_SETTLE_SECONDS="0", LOYALTY_AWARD_WINDOW_SECONDS="0.2"
    ) as (
        base,
        output,
    ):
        ingest = {"Authorization": f"Bearer {create_key(url, 'ingest', 'games')}"}
        shop = {"Authorization": f"Bearer {create_key(url, 'shop', 'webshop')}"}
        ops = {"Authorization": f"Bearer {create_key(url, 'operator', 'ops')}"}
        statuses: Counter[tuple[str, int]] = Counter()
        requests: list[str] = []
        lock = threading.Lock()
        deadline = time.monotonic() + DEADLINE
        done = threading.Event()

        def client(n: int) -> None:
            rnd = random.Random(n)
            with httpx.Client(base_url=base, timeout=60) as http:
                i = 0
                while not done.is_set():
                    assert time.monotonic() < deadline, f"load not done: {dict(statuses)}"
                    i += 1
                    user = rnd.choice(MEMBERS)
                    roll = rnd.random()
                    if roll < 0.30:
                        kind = "ingest"
                        events = [
                            {
                                "event_id": f"c{n}.{i}.{j}",
                                "user_id": rnd.choice(MEMBERS),
                                "type": rnd.choice(
                                    ["joined_competition", "played_game", "logged_on"]
                                ),
                                "occurred_at": datetime.now(UTC).isoformat(),
                            }
                            for j in range(50)
                        ]
                        r = http.post(
                            "/v1/ingress/batches", json={"events": events}, headers=ingest
                        )
                    elif roll < 0.50:
                        kind = "spend"
                        body = {"order_id": f"o{n}.{i}", "amount": 1}
                        r = http.post(f"/v1/members/{user}/spend", json=body, headers=shop)
                    elif roll < 0.60:
                        kind = "adjust"
                        body = {
                            "adjustment_id": f"a{n}.{i}",
                            "currency": 5,
                            "rank_points": 1,
                            "reason": "load",
                        }
                        r = http.post(f"/v1/members/{user}/adjustments", json=body, headers=ops)
                    elif roll < 0.98:
                        kind = "get"
                        r = http.get(f"/v1/members/{user}", headers=shop)
                    else:
                        kind = "forget"
                        r = http.post("/v1/forget-requests", json={"user_id": user}, headers=ops)
                        if r.status_code == 202:
                            with lock:
                                requests.append(r.json()["request_id"])
                    with lock:
                        statuses[(kind, r.status_code)] += 1
                        if statuses.total() >= REQUESTS and len(requests) >= FORGETS:
                            done.set()

        with ThreadPoolExecutor(CLIENTS) as pool:
            for future in [pool.submit(client, n) for n in range(CLIENTS)]:
                future.result()  # a client's failure (a timeout, the deadline) fails the test

        # every forget request completes
        with httpx.Client(base_url=base, headers=ops, timeout=30) as http:
            until = time.monotonic() + 90
            for request_id in requests:
                while http.get(f"/v1/forget-requests/{request_id}").json()["status"] != "completed":
                    assert time.monotonic() < until, "forget requests did not complete"
                    time.sleep(0.2)

            # the read models still move: a new member's adjustment reaches its history
            # and the leaderboard; nothing was quarantined
            probe = {"adjustment_id": "probe", "currency": 7, "rank_points": 10**6, "reason": "p"}
            assert http.post("/v1/members/probe/adjustments", json=probe).status_code == 200
            until = time.monotonic() + 60
            while True:
                history = http.get("/v1/members/probe/history", headers=shop).json()
                board = http.get("/v1/leaderboard", headers=shop).json()["entries"]
                if history.get("entries") and board and board[0]["user_id"] == "probe":
                    break
                assert time.monotonic() < until, f"read models stuck: {history}"
                time.sleep(0.2)
            pipeline = http.get("/v1/pipeline").json()
            # every member still reads (no account broken by an orphan)
            for user in MEMBERS:
                assert http.get(f"/v1/members/{user}", headers=shop).status_code in (200, 404)

        summary = dict(sorted(statuses.items()))
        print(f"forget under load, {settings.backend}: {summary}")  # shown with -s
        server_errors = {k: v for k, v in summary.items() if k[1] == 500}
        assert not server_errors, (summary, output()[-5000:])
        assert sum(summary.values()) >= REQUESTS, summary
        assert len(requests) >= FORGETS, summary
        assert pipeline.get("quarantined_events", 0) == 0, pipeline
    assert orphan_streams(settings) == 0, summary
