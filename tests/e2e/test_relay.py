"""The RabbitMQ relay against the real broker: every event id arrives, in commit order
per member, persistent, with message_id = the feed's event id; across kill -9 of the
relay and a broker restart (of a RabbitMQ node of the test's own)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson
import pika
import pika.exceptions
import pytest
from fastapi.testclient import TestClient

from loyalty.adapters.db import Database
from loyalty.bootstrap import build_relay
from loyalty.worker import run_relay
from tests.conftest import backends
from tests.e2e.live import LOYALTY, env_for
from tests.e2e.rabbitnode import RabbitNode, rabbitmq_bin


class Consumer:
    """A durable queue bound to the exchange ('#'); collects every message."""

    def __init__(self, url: str, exchange: str) -> None:
        self.url, self.exchange = url, exchange
        self.queue = f"test-{uuid.uuid4().hex[:12]}"
        self.messages: list[tuple[str, str, dict[str, Any], Any]] = []
        with self._channel() as ch:
            ch.exchange_declare(exchange, exchange_type="topic", durable=True)
            ch.queue_declare(self.queue, durable=True)
            ch.queue_bind(self.queue, exchange, routing_key="#")

    @contextmanager
    def _channel(self) -> Iterator[Any]:
        connection = pika.BlockingConnection(pika.URLParameters(self.url))
        try:
            yield connection.channel()
        finally:
            connection.close()

    def drain(self) -> int:
        with self._channel() as ch:
            while True:
                method, props, body = ch.basic_get(self.queue, auto_ack=True)
                if method is None:
                    return len(self.messages)
                self.messages.append(
                    (method.routing_key, props.message_id, orjson.loads(body), props)
                )

    def close(self) -> None:
        with self._channel() as ch:
            ch.queue_delete(self.queue)
            ch.exchange_delete(self.exchange)


def feed_ids(client: TestClient, headers: dict[str, str]) -> list[dict[str, Any]]:
    events, after = [], None
    while True:
        params: dict[str, Any] = {"limit": 1000, **({"after": after} if after else {})}
        page = client.get("/v1/feed", params=params, headers=headers).json()
        if not page["events"]:
            return events
        events += page["events"]
        after = page["next"]


def adjust(client: TestClient, headers: dict[str, str], user: str, n: int) -> None:
    r = client.post(
        f"/v1/members/{user}/adjustments",
        json={"adjustment_id": f"a{n}", "currency": 1, "rank_points": 0, "reason": "r"},
        headers=headers,
    )
    assert r.status_code == 200, r.text


def check_order(
    messages: list[tuple[str, str, dict[str, Any], Any]], expected: list[dict[str, Any]]
) -> int:
    """Every expected id arrived; per member, first arrivals follow commit order; returns
    the number of duplicates."""
    seen: dict[str, dict[str, Any]] = {}
    for _, message_id, body, _ in messages:
        seen.setdefault(message_id, body)
    assert set(seen) == {e["id"] for e in expected}, "ids lost or foreign"
    rank = {e["id"]: i for i, e in enumerate(expected)}
    per_member: dict[str, list[int]] = {}
    for message_id, body in seen.items():
        per_member.setdefault(body["user_id"], []).append(rank[message_id])
    for user, ranks in per_member.items():
        assert ranks == sorted(ranks), f"order of {user} broken"
    return len(messages) - len(seen)


@pytest.fixture
def exchange() -> str:
    return f"loyalty.test.{uuid.uuid4().hex[:10]}"


def test_relay_publishes_every_event_persistent_in_commit_order(
    client: TestClient,
    db: Database,
    make_key: Callable[..., dict[str, str]],
    amqp_url: str,
    exchange: str,
) -> None:
    ops, feed = make_key("operator", "ops"), make_key("feed", "f")
    consumer = Consumer(amqp_url, exchange)
    loop = build_relay(db, amqp_url, exchange=exchange, batch_size=7)
    thread = threading.Thread(target=run_relay, args=(db, loop), kwargs={"poll_seconds": 0.05})
    try:
        for n, user in enumerate(["a", "b", "a", "c", "a", "b"] * 4):
            adjust(client, ops, user, n)
        thread.start()
        expected = feed_ids(client, feed)
        deadline = time.monotonic() + 20
        while consumer.drain() < len(expected) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert check_order(consumer.messages, expected) == 0
        key, message_id, body, props = consumer.messages[-1]
        assert key == body["type"] == "member.adjusted" and message_id == body["id"]
        assert props.delivery_mode == 2 and props.content_type == "application/json"
        assert [m[1] for m in consumer.messages] == [e["id"] for e in expected]
    finally:
        loop.stop()
        thread.join(timeout=10)
        consumer.close()


@backends("postgresql")
@pytest.mark.slow
def test_relay_killed_ten_times_loses_nothing(
    client: TestClient,
    db: Database,
    make_key: Callable[..., dict[str, str]],
    amqp_url: str,
    exchange: str,
    tmp_path: Path,
) -> None:
    ops, feed = make_key("operator", "ops"), make_key("feed", "f")
    consumer = Consumer(amqp_url, exchange)
    stop = threading.Event()
    written = [0]

    def write() -> None:
        n = 0
        while not stop.is_set():
            adjust(client, ops, f"m{n % 7}", n)
            n += 1
            written[0] = n
            time.sleep(0.005)

    writer = threading.Thread(target=write, daemon=True)
    env = env_for(db.settings.database_url)
    args = [*LOYALTY, "relay", "--amqp-url", amqp_url, "--exchange", exchange, "--batch", "20"]
    log = (tmp_path / "relay.log").open("ab")
    kills = 0
    try:
        writer.start()
        for _ in range(10):
            proc = subprocess.Popen(args, env=env, stdout=log, stderr=log)
            # killed once it has published (start-up takes ~1 s on a quiet machine,
            # several on a loaded one), at a random moment after
            before, deadline = len(consumer.messages), time.monotonic() + 15
            while len(consumer.messages) == before and time.monotonic() < deadline:
                time.sleep(0.1)
                consumer.drain()
            time.sleep(random.uniform(0.0, 0.5))
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            kills += 1
            consumer.drain()
        stop.set()
        writer.join(timeout=10)
        during_kills = len(consumer.messages)
        assert during_kills > 0, "the killed relays published nothing"
        proc = subprocess.Popen(args, env=env, stdout=log, stderr=log)
        expected = feed_ids(client, feed)
        deadline = time.monotonic() + 60
        while {m[1] for m in consumer.messages} != {e["id"] for e in expected}:
            assert time.monotonic() < deadline, "relay did not catch up"
            time.sleep(0.2)
            consumer.drain()
        proc.terminate()
        proc.wait(timeout=20)
        duplicates = check_order(consumer.messages, expected)
        print(
            f"\nrelay: {kills} kills, {len(expected)} events ({during_kills} published "
            f"while killing), {duplicates} duplicates"
        )
        assert kills >= 10 and written[0] > 100
        assert duplicates <= kills * 20  # at most one in-flight batch per kill
    finally:
        stop.set()
        consumer.close()
        log.close()


@pytest.fixture
def private_broker() -> Iterator[RabbitNode]:
    """A RabbitMQ node of this test's own (tests/e2e/rabbitnode.py), to restart."""
    bindir = rabbitmq_bin()
    if bindir is None:
        if os.environ.get("CI"):
            pytest.fail("rabbitmq-server is required in CI (.ci/run installs it)")
        pytest.skip("rabbitmq-server is not installed")
    node = RabbitNode(bindir)
    try:
        node.start()
        yield node
    finally:
        node.destroy()


@backends("sqlite")
@pytest.mark.slow
def test_broker_restart_mid_stream_loses_nothing(
    client: TestClient,
    db: Database,
    make_key: Callable[..., dict[str, str]],
    private_broker: RabbitNode,
    exchange: str,
) -> None:
    """A broker of the test's own (not the machine's shared one, whose other users would
    lose their connections) is stopped and started (stop_app / start_app) while the relay
    publishes: every event arrives, in order per member. The restart is timed by events
    (published before, committed during the outage), not sleeps."""
    ops, feed = make_key("operator", "ops"), make_key("feed", "f")
    url = private_broker.url
    consumer = Consumer(url, exchange)
    loop = build_relay(db, url, exchange=exchange, batch_size=20)
    relay = threading.Thread(target=run_relay, args=(db, loop), kwargs={"poll_seconds": 0.05})
    stop = threading.Event()
    written = [0]

    def write() -> None:
        n = 0
        while not stop.is_set():
            adjust(client, ops, f"r{n % 5}", n)
            n += 1
            written[0] = n
            time.sleep(0.005)

    def wait(what: str, done: Callable[[], bool], timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            assert time.monotonic() < deadline, what
            time.sleep(0.05)

    writer = threading.Thread(target=write, daemon=True)
    try:
        relay.start()
        writer.start()
        wait("nothing published before the restart", lambda: consumer.drain() > 0)
        before = len(consumer.messages)
        private_broker.stop_app()
        try:
            # the relay fails and backs off while events keep committing
            during = written[0]
            wait("no event committed during the outage", lambda: written[0] >= during + 20)
        finally:
            private_broker.start_app()
        after = written[0]
        wait("no event committed after the restart", lambda: written[0] >= after + 20)
        stop.set()
        writer.join(timeout=10)
        expected = feed_ids(client, feed)
        deadline = time.monotonic() + 90
        while {m[1] for m in consumer.messages} != {e["id"] for e in expected}:
            assert time.monotonic() < deadline, "relay did not catch up after the restart"
            time.sleep(0.3)
            consumer.drain()
        duplicates = check_order(consumer.messages, expected)
        print(f"\nbroker restart: {len(expected)} events ({before} before), {duplicates} dup")
        assert before > 0
    finally:
        stop.set()
        loop.stop()
        relay.join(timeout=30)
        consumer.close()


def consume_with(url: str, queue: str, consumers: int, total: int) -> tuple[int, list[str]]:
    """``consumers`` queue consumers (prefetch 1) whose handler sleeps 1 s, then acks;
    returns the most handlers that ran at once until ``total`` messages were
    acknowledged, and their ids."""
    acked: list[str] = []
    lock = threading.Lock()
    done = threading.Event()
    running, most = [0], [0]

    def consume() -> None:
        connection = pika.BlockingConnection(pika.URLParameters(url))
        channel = connection.channel()
        channel.basic_qos(prefetch_count=1)

        def handle(ch: Any, method: Any, props: Any, _body: bytes) -> None:
            with lock:
                running[0] += 1
                most[0] = max(most[0], running[0])
            time.sleep(1.0)
            ch.basic_ack(method.delivery_tag)
            with lock:
                running[0] -= 1
                acked.append(props.message_id)
                if len(acked) >= total:
                    done.set()

        channel.basic_consume(queue, handle)
        while not done.is_set():
            connection.process_data_events(time_limit=0.1)
        connection.close()

    with ThreadPoolExecutor(consumers) as pool:
        futures = [pool.submit(consume) for _ in range(consumers)]
        finished = done.wait(total * 1.5 + 10)
        done.set()  # (if not finished: the consumers stop, and the assert below tells)
        for future in futures:
            future.result(timeout=30)  # a consumer's error fails the test
    assert finished, "consumers did not finish"
    return most[0], acked


@backends("sqlite")
@pytest.mark.slow
def test_queue_consumers_scale_and_handle_each_message_once(
    client: TestClient,
    db: Database,
    make_key: Callable[..., dict[str, str]],
    amqp_url: str,
    exchange: str,
) -> None:
    """The seed's stress scenario on the relay's queue: handlers sleep 1 s; 8 consumers
    handle several messages at once (2 never more than 2: prefetch 1); every id is
    acknowledged once. (Counts, not wall-clock ratios: those fail on a busy machine.)"""
    ops, feed = make_key("operator", "ops"), make_key("feed", "f")
    consumer = Consumer(amqp_url, exchange)  # declares the durable queue, bound '#'
    loop = build_relay(db, amqp_url, exchange=exchange, batch_size=50)
    relay = threading.Thread(target=run_relay, args=(db, loop), kwargs={"poll_seconds": 0.05})
    relay.start()
    try:
        at_once = {}
        for consumers in (2, 8):
            start = len(feed_ids(client, feed))
            for n in range(8):
                adjust(client, ops, f"s{consumers}-{n % 2}", n)
            expected = [
                e["id"] for e in feed_ids(client, feed)[start:] if e["type"] == "member.adjusted"
            ]
            # wait for the relay, then consume just the adjustments' share of the queue
            total = len(feed_ids(client, feed)) - start
            most, acked = consume_with(amqp_url, consumer.queue, consumers, total)
            assert len(acked) == len(set(acked)) == total, "a message was handled twice"
            assert set(expected) <= set(acked), "a message was lost"
            at_once[consumers] = most
        print(f"\nhandlers at once: {at_once}")
        assert at_once[2] == 2
        assert 4 <= at_once[8] <= 8
    finally:
        loop.stop()
        relay.join(timeout=10)
        consumer.close()


def test_relay_waits_for_the_database_at_start_like_serve_and_worker(tmp_path: Path) -> None:
    """#27: with the database out of reach, `loyalty relay` exited at once with a
    traceback; it now waits and retries (as serve and worker do) instead of dying."""
    env = env_for("postgresql://postgres@127.0.0.1:1/loyalty")  # nothing listens there
    log = tmp_path / "relay.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [*LOYALTY, "relay", "--amqp-url", "amqp://guest:guest@127.0.0.1:5672/"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 60
            while "retrying" not in log.read_text() and time.monotonic() < deadline:
                assert proc.poll() is None, log.read_text()
                time.sleep(0.2)
            time.sleep(1.0)
            assert proc.poll() is None, log.read_text()  # still waiting, not dead
            assert "database unavailable" in log.read_text()
            assert "Traceback" not in log.read_text()
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
