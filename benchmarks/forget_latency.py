"""Forget-me latency for a member with 10k account events and 100k ingress events
(among 500k), on a fresh PostgreSQL database that this script creates and drops.

    .venv/bin/python -m benchmarks.forget_latency [--admin-url postgresql://postgres@127.0.0.1:5432/postgres]

Prints one JSON line; the settle wait (LOYALTY_FORGET_SETTLE_SECONDS, default 2 s) is
set to 0 here and comes on top in production.
"""

from __future__ import annotations

import argparse
import json
import random
import time
import uuid
from datetime import UTC, datetime, timedelta

import psycopg
import sqlalchemy as sa

from loyalty.adapters.db import Database
from loyalty.adapters.migrate import migrate
from loyalty.api.app import build_container
from loyalty.application.accounts import AwardCommand
from loyalty.application.ingress import IncomingEvent
from loyalty.bootstrap import build_forget_service
from loyalty.config import Settings
from loyalty.domain.ranks import Rank, RankLadder


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--admin-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    args = parser.parse_args()
    name = f"loyalty_bench_forget_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(args.admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')  # type: ignore[arg-type]
    url = args.admin_url.rsplit("/", 1)[0] + "/" + name
    try:
        settings = Settings(database_url=url, forget_settle_seconds=0.0)
        db = Database(settings)
        migrate(db)
        container = build_container(settings, db=db)
        ladder = RankLadder((Rank("base", 0, ()),))
        awards = [AwardCommand("victim", f"a{i}", 1, 1, 1, 1) for i in range(9_999)]
        for i in range(0, len(awards), 500):
            container.accounts.award_many(awards[i : i + 500], ladder)
        now = datetime.now(UTC)
        rnd = random.Random(1)

        def at() -> datetime:
            return now - timedelta(seconds=rnd.randrange(5 * 86400))

        events = [
            IncomingEvent(f"v{i}", "victim", "played_game", at(), "{}") for i in range(100_000)
        ]
        events += [
            IncomingEvent(f"o{i}", f"u{i % 5000}", "played_game", at(), "{}")
            for i in range(400_000)
        ]
        rnd.shuffle(events)
        for i in range(0, len(events), 5000):
            container.ingest.ingest("bench", events[i : i + 5000])
        with db.read() as conn:
            stream = conn.execute(sa.text("SELECT count(*) FROM members_events")).scalar()
        service = build_forget_service(db)
        request = service.request("victim")
        started = time.perf_counter()
        service.run_pending()
        seconds = time.perf_counter() - started
        done = service.status(request.request_id)
        print(
            json.dumps(
                {
                    "name": "forget_latency",
                    "value": round(seconds, 3),
                    "unit": "s",
                    "account_events": stream,
                    "ingress_events_total": len(events),
                    "erased": done.erased if done else None,
                }
            )
        )
        container.accounts.close()
        db.dispose()
    finally:
        with psycopg.connect(args.admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')  # type: ignore[arg-type]


if __name__ == "__main__":
    main()
