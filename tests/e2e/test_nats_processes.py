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
            if pending == 0 and store.totals()[0] == total:
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
    """Batches sent to ``serve --no-worker`` while it is killed -9 now and then: a batch
    without an answer is sent again (to the restarted API), as a client does; every
    event ends up in the stream and on the account once."""
    js = on_jetstream(settings, nats_server)
    events = make_events(12_000, 150, seed=23)
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
    batches = [wire[i : i + 1500] for i in range(0, len(wire), 1500)]
    key = create_key(js.database_url, "ingest", "src")
    auth = {"Authorization": f"Bearer {key}"}
    answered: set[int] = set()
    resent_dupes: list[int] = []  # per answered batch: events stored by an earlier try
    kills = 0
    rnd = random.Random(3)
    while len(answered) < len(batches):
        with serve_process(js.database_url, "--no-worker", **js_env(js)) as server:
            stop = threading.Event()

            def send(base: str = server.base, stop: threading.Event = stop) -> None:
                with httpx.Client(base_url=base, timeout=30) as http:
                    for i, batch in enumerate(batches):
                        if stop.is_set():
                            return
                        if i in answered:
                            continue
                        try:
                            r = http.post(
                                "/v1/ingress/batches", json={"events": batch}, headers=auth
                            )
                        except httpx.TransportError:
                            return  # the API died under the request: sent again later
                        if r.status_code == 202:
                            answered.add(i)
                            resent_dupes.append(r.json()["duplicates"])

            sender = threading.Thread(target=send)
            sender.start()
            if kills < 4:
                time.sleep(rnd.uniform(0.3, 1.5))
                os.kill(server.proc.pid, signal.SIGKILL)
                kills += 1
            sender.join(120)
            stop.set()
    # a client that never got an answer for a batch that was stored, resending it later,
    # and one resending a batch it did get an answer for: both all duplicates
    with serve_process(js.database_url, "--no-worker", **js_env(js)) as server:
        r = httpx.post(
            server.base + "/v1/ingress/batches",
            json={"events": batches[0]},
            headers=auth,
            timeout=30,
        )
        assert r.status_code == 202 and r.json()["accepted"] == 0
    db = Database(js)
    try:
        assert jetstream_log(db).stream_bytes()[0] == len(events)
        with worker(js):
            wait_until_drained(js, len(events))
        want = expected(events)
        assert balances(js, sorted(want)) == want
        assert kills == 4
        print(
            "batches answered with duplicates (stored before their API died):",
            [d for d in resent_dupes if d],
        )
    finally:
        db.dispose()
