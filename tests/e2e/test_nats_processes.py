"""The ingress log on NATS JetStream with real processes (issue 31, item 5): each event
counted exactly once across kill -9 of pipeline workers, kill -9 of an API while it
publishes, and kill -9 + restart of the NATS server (a private one on its own port and
store directory, tests/conftest.py ``nats_server``)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import httpx
import orjson
import pytest
import sqlalchemy as sa

from loyalty.adapters.db import Database
from loyalty.adapters.nats_log import JetStreamUnavailable, jetstream_log
from loyalty.adapters.pipeline_store import PipelineStore
from loyalty.application.ingress import IngestService
from loyalty.bootstrap import backlog_of
from loyalty.config import Settings
from tests.conftest import NatsServer, backends, on_jetstream
from tests.e2e.live import LOYALTY, create_key, env_for, serve_process
from tests.e2e.test_worker_processes import NOW, balances, expected, make_events

pytestmark = [pytest.mark.slow, backends("postgresql")]


def js_env(settings: Settings) -> dict[str, str]:
    return {
        "LOYALTY_INGRESS_URL": settings.ingress_url,
        "LOYALTY_INGRESS_STREAM": settings.ingress_stream,
    }


@contextmanager
def worker(settings: Settings) -> Iterator[subprocess.Popen[bytes]]:
    env = env_for(
        settings.database_url,
        LOYALTY_AWARD_WINDOW_SECONDS="0.05",
        LOYALTY_PIPELINE_CHUNK="300",
        LOYALTY_AWARD_INTERVAL_SECONDS="0",
        **js_env(settings),
    )
    proc = subprocess.Popen(
        [*LOYALTY, "worker", "--shards", "all"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
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


def unrecorded(db: Database) -> int:
    """Members whose earnings are weighed but not yet recorded on the account (the
    worker records them after its drain)."""
    with db.read() as conn:
        return int(conn.execute(sa.text("SELECT count(*) FROM pipeline_pending")).scalar_one())


def wait_until_drained(settings: Settings, total: int, timeout: float = 180) -> None:
    db = Database(settings)
    store, backlog = PipelineStore(db), backlog_of(db)
    deadline = time.monotonic() + timeout
    pending = -1
    try:
        while time.monotonic() < deadline:
            try:
                pending, _ = backlog(store.positions())
            except JetStreamUnavailable:  # the server restarting: ask again
                time.sleep(0.2)
                continue
            if pending == 0 and store.totals()[0] == total and not unrecorded(db):
                return
            time.sleep(0.2)
        raise AssertionError(f"not drained: pending={pending}, totals={store.totals()}")
    finally:
        db.dispose()


def test_kill_9_of_workers_and_of_the_nats_server_counts_each_event_once(
    settings: Settings, nats_server: NatsServer
) -> None:
    js = on_jetstream(settings, nats_server)
    events = make_events(8_000, 120, seed=17)
    db = Database(js)
    service = IngestService(
        jetstream_log(db),
        clock=lambda: NOW,
        retention=timedelta(days=7),
        future_skew=timedelta(minutes=5),
        shard_count=js.shard_count,
    )
    rnd = random.Random(5)
    kills, sent, restarts = 0, 0, 0
    try:
        while kills < 12 or sent < len(events):
            with worker(js) as proc:
                deadline = time.monotonic() + rnd.uniform(0.8, 2.0)
                while time.monotonic() < deadline:
                    if sent < len(events):
                        service.ingest("src", events[sent : sent + 400])
                        sent += 400
                    time.sleep(0.02)
                if kills in (4, 9):  # the NATS server dies under the worker, and returns
                    nats_server.restart()
                    restarts += 1
                assert proc.poll() is None
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                kills += 1
        with worker(js):
            wait_until_drained(js, len(events))
        want = expected(events)
        assert balances(js, sorted(want)) == want
        assert PipelineStore(db).totals()[0] == len(events)
        assert jetstream_log(db).stream_bytes()[0] == len(events)
        assert restarts == 2
    finally:
        db.dispose()


def test_kill_9_of_an_api_mid_publish_then_resends_count_each_event_once(
    settings: Settings, nats_server: NatsServer
) -> None:
    """``serve --no-worker`` killed -9 while it publishes a batch (as soon as the first
    of its messages is in the stream, before its acks are all in and its keys confirmed),
    three times; the client sends every unanswered batch again to a new API: every
    event ends up in the stream and on the account once."""
    js = on_jetstream(settings, nats_server)
    events = make_events(16_000, 150, seed=23)
    wire = [
        {
            "event_id": e.event_id,
            "user_id": e.user_id,
            "type": e.type,
            "occurred_at": e.occurred_at.isoformat(),
            "attributes": orjson.loads(e.attributes_json),
        }
        for e in events
    ]
    batches = [wire[i : i + 4000] for i in range(0, len(wire), 4000)]
    key = create_key(js.database_url, "ingest", "src")
    auth = {"Authorization": f"Bearer {key}"}
    db = Database(js)
    stream = jetstream_log(db)

    def unconfirmed() -> int:
        with db.read() as conn:
            return int(
                conn.execute(
                    sa.text("SELECT count(*) FROM stream_ingress_keys WHERE seq IS NULL")
                ).scalar_one()
            )

    try:
        left_unconfirmed, partial = [], []
        for batch in batches[:3]:
            before = stream.stream_bytes()[0]
            with serve_process(js.database_url, "--no-worker", **js_env(js)) as server:

                def send(base: str = server.base, batch: list[dict[str, object]] = batch) -> None:
                    try:
                        httpx.post(
                            base + "/v1/ingress/batches",
                            json={"events": batch},
                            headers=auth,
                            timeout=60,
                        )
                    except httpx.TransportError:
                        pass  # killed under the request: no answer, as expected

                sender = threading.Thread(target=send)
                sender.start()
                deadline = time.monotonic() + 60
                while stream.stream_bytes()[0] == before:  # the publish has begun
                    assert time.monotonic() < deadline, "the batch never reached the stream"
                    time.sleep(0.002)
                os.kill(server.proc.pid, signal.SIGKILL)
                sender.join(60)
            left_unconfirmed.append(unconfirmed())
            partial.append(stream.stream_bytes()[0] - before)
        # the kills landed mid-publish: claims left unconfirmed every time
        assert all(left_unconfirmed), (left_unconfirmed, partial)
        with (
            serve_process(js.database_url, "--no-worker", **js_env(js)) as server,
            httpx.Client(base_url=server.base, timeout=60) as http,
        ):
            for batch in batches:  # every batch: the killed three again, and the rest
                r = http.post("/v1/ingress/batches", json={"events": batch}, headers=auth)
                assert r.status_code == 202
                assert r.json()["accepted"] + r.json()["duplicates"] == len(batch)
                assert r.json()["conflicts"] == 0
            # a resend of a batch that was answered: all duplicates
            r = http.post("/v1/ingress/batches", json={"events": batches[-1]}, headers=auth)
            assert r.json()["accepted"] == 0
        assert unconfirmed() == 0
        assert stream.stream_bytes()[0] == len(events)
        with worker(js):
            wait_until_drained(js, len(events))
        want = expected(events)
        assert balances(js, sorted(want)) == want
        print("stored of each killed batch before the kill:", partial)
    finally:
        db.dispose()
