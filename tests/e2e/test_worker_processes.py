"""The pipeline worker as real processes: kill -9 at random points, and scale-out."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta

import orjson
import pytest
import sqlalchemy as sa

from loyalty.adapters.db import Database
from loyalty.adapters.event_store import event_store_env
from loyalty.adapters.ingress_log import create_ingress_log, pending_stats
from loyalty.adapters.pipeline_store import PipelineStore
from loyalty.application.accounts import Members
from loyalty.application.commands.rules import parse_rule_set
from loyalty.application.ingress import IncomingEvent, IngestService
from loyalty.config import Settings
from loyalty.domain.member import Member
from loyalty.domain.rules import DEFAULT_RULES_WIRE, Activity, CapCounter, aggregate
from tests.e2e.live import LOYALTY, env_for

pytestmark = pytest.mark.slow
NOW = datetime.now(UTC).replace(microsecond=0)
TYPES = ["logged_on", "played_game", "joined_competition", "made_purchase", "unknown"]


def make_events(n: int, users: int, seed: int) -> list[IncomingEvent]:
    rnd = random.Random(seed)
    return [
        IncomingEvent(
            f"e{i}",
            f"user-{rnd.randrange(users)}",
            rnd.choice(TYPES),
            NOW - timedelta(hours=rnd.randrange(40)),
            rnd.choice(["{}", '{"result": "win"}']),
        )
        for i in range(n)
    ]


def expected(events: list[IncomingEvent]) -> dict[str, tuple[int, int]]:
    rules = parse_rule_set(DEFAULT_RULES_WIRE, 1)
    result = aggregate(
        (
            Activity(e.user_id, e.type, e.occurred_at, orjson.loads(e.attributes_json))
            for e in events
        ),
        rules,
        CapCounter(),
    )
    return {
        u: (d.currency, d.rank_points)
        for u, d in result.drafts.items()
        if d.currency or d.rank_points
    }


def ingester(settings: Settings) -> IngestService:
    return IngestService(
        create_ingress_log(Database(settings)),
        clock=lambda: NOW,
        retention=timedelta(days=7),
        future_skew=timedelta(minutes=5),
        shard_count=settings.shard_count,
    )


@contextmanager
def worker(
    settings: Settings, shards: str = "all", interval: str = "0"
) -> Iterator[subprocess.Popen[bytes]]:
    env = env_for(
        settings.database_url,
        LOYALTY_AWARD_WINDOW_SECONDS="0.05",
        LOYALTY_PIPELINE_CHUNK="300",
        # "0": pending earnings are recorded after every drain
        LOYALTY_AWARD_INTERVAL_SECONDS=interval,
    )
    proc = subprocess.Popen(
        [*LOYALTY, "worker", "--shards", shards],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def wait_until_drained(settings: Settings, total: int, timeout: float = 120) -> None:
    db = Database(settings)
    store = PipelineStore(db)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            pending, _ = pending_stats(db, store.positions(), settings.shard_count)
            if pending == 0 and store.totals()[0] == total:
                return
            time.sleep(0.1)
        raise AssertionError(f"not drained: pending={pending}, totals={store.totals()}")
    finally:
        db.dispose()


def wait_until_recorded(settings: Settings, timeout: float = 120) -> None:
    """Until no weighed earnings wait to be recorded on accounts: the worker records
    them after its drain, so a read of the accounts (without the pending part the API
    adds) right after the checkpoints reach the total can come before it."""
    db = Database(settings)
    deadline = time.monotonic() + timeout
    try:
        while True:
            with db.read() as conn:
                left = int(
                    conn.execute(sa.text("SELECT count(*) FROM pipeline_pending")).scalar_one()
                )
            if not left:
                return
            assert time.monotonic() < deadline, f"{left} members' earnings never recorded"
            time.sleep(0.1)
    finally:
        db.dispose()


def balances(settings: Settings, users: list[str]) -> dict[str, tuple[int, int]]:
    app = Members(env=event_store_env(settings))
    try:
        out = {}
        for user in users:
            m: Member = app.repository.get(Member.create_id(user))
            out[user] = (m.currency, m.rank_points)
        return out
    finally:
        app.close()


def test_kill_9_at_random_points_while_batches_flow(settings: Settings) -> None:
    events = make_events(12_000, 150, seed=7)
    service = ingester(settings)
    rnd = random.Random(11)
    kills, sent = 0, 0
    while kills < 22 or sent < len(events):
        with worker(settings) as proc:
            deadline = time.monotonic() + rnd.uniform(0.6, 1.6)
            while time.monotonic() < deadline:
                if sent < len(events):
                    service.ingest("src", events[sent : sent + 400])
                    sent += 400
                time.sleep(0.02)
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            kills += 1
    with worker(settings):
        wait_until_drained(settings, len(events))
        wait_until_recorded(settings)
    want = expected(events)
    assert balances(settings, sorted(want)) == want
    db = Database(settings)
    assert PipelineStore(db).totals()[0] == len(events)
    db.dispose()


def test_two_workers_on_disjoint_shards_match_one(settings: Settings) -> None:
    events = make_events(6_000, 120, seed=3)
    service = ingester(settings)
    with worker(settings, "0-7"), worker(settings, "8-15"):
        for i in range(0, len(events), 500):
            service.ingest("src", events[i : i + 500])
        wait_until_drained(settings, len(events))
        wait_until_recorded(settings)
    want = expected(events)
    assert balances(settings, sorted(want)) == want
