"""No way out carries a forgotten member's account events once the erasure completed
(issue 25, case 4), each proved with a receiver that fails while the erasure runs and
then recovers: webhooks retrying a batch read before the erasure, a retry that runs out
(no dead letter is parked), a replay of a dead letter, the pull feed, and the RabbitMQ
relay behind a connection that is down during the erasure."""

from __future__ import annotations

import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from fastapi.testclient import TestClient

from loyalty.adapters.db import Database
from loyalty.adapters.delivery_store import SqlDeliveryStore
from loyalty.api.app import create_app
from loyalty.application.delivery import RetryPolicy
from loyalty.bootstrap import build_forget_service, build_relay, build_webhook_dispatcher
from loyalty.config import Settings
from loyalty.observability import Metrics
from tests.conftest import Clock
from tests.e2e.test_webhooks import Receiver, adjust, sample, subscribe, wait_for

VICTIM, KEEPER = "victim", "keeper"


@pytest.fixture
def api(settings: Settings, db: Database, clock: Clock) -> Iterator[TestClient]:
    allow = settings.model_copy(
        update={
            "webhook_allow_private_urls": True,
            "webhook_timeout_seconds": 1.0,
            "forget_settle_seconds": 0.0,
            "marker_refresh_seconds": 0.01,
        }
    )
    db.settings = allow  # type: ignore[misc]
    with TestClient(create_app(allow, db=db, clock=clock)) as c:
        yield c


@contextmanager
def dispatching(
    db: Database, policy: RetryPolicy, metrics: Metrics | None = None
) -> Iterator[None]:
    dispatcher = build_webhook_dispatcher(
        db, refresh=0.1, poll_seconds=0.05, policy=policy, metrics=metrics, max_pause=0.2
    )
    thread = threading.Thread(target=dispatcher.run, daemon=True)
    thread.start()
    try:
        yield
    finally:
        dispatcher.stop()
        thread.join(timeout=20)


def forget(db: Database, user_id: str) -> float:
    """Request and complete the erasure; returns when it completed (monotonic)."""
    service = build_forget_service(db)
    request = service.request(user_id)
    assert service.run_pending() == 1
    done = service.status(request.request_id)
    assert done is not None and done.completed_at is not None
    return time.monotonic()


def victim_events(bodies: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [b for b in bodies if b["user_id"] == VICTIM and b["type"] != "member.forgotten"]


def dead_letter_users(db: Database) -> list[str]:
    return [d.event.user_id for d in SqlDeliveryStore(db).dead_letters()]


def test_a_webhook_retrying_a_batch_read_before_the_erasure_drops_it(
    api: TestClient, db: Database, make_key: Callable[..., dict[str, str]]
) -> None:
    ops = make_key("operator", "ops")
    down = {"on": True}
    receiver = Receiver(lambda _b, _h, _n: 500 if down["on"] else 200)
    metrics = Metrics(process=False)
    try:
        subscribe(api, ops, receiver.url, [])
        with dispatching(db, RetryPolicy(0.05, 0.2, 600.0), metrics):
            adjust(api, ops, VICTIM, 1)
            adjust(api, ops, KEEPER, 2)
            wait_for(lambda: sum(receiver.attempts.values()) >= 2)  # retrying the victim's
            completed = forget(db, VICTIM)
            down["on"] = False
            wait_for(lambda: {b["user_id"] for b in receiver.bodies()} >= {KEEPER, VICTIM})
        after = [
            b for b in victim_events(receiver.bodies()) if receiver.arrived[b["id"]] > completed
        ]
        assert after == [], after
        assert [b["type"] for b in receiver.bodies() if b["user_id"] == VICTIM] == [
            "member.forgotten"
        ]
        assert sample(metrics, "loyalty_deliveries_total", outcome="erased_dropped") >= 1
    finally:
        receiver.close()


def test_a_retry_that_runs_out_after_the_erasure_parks_no_dead_letter(
    api: TestClient, db: Database, make_key: Callable[..., dict[str, str]]
) -> None:
    ops = make_key("operator", "ops")
    receiver = Receiver(lambda _b, _h, _n: 503)
    try:
        subscribe(api, ops, receiver.url, ["member.adjusted"])
        with dispatching(db, RetryPolicy(0.05, 0.1, 1.5)):
            adjust(api, ops, VICTIM, 1)
            wait_for(lambda: sum(receiver.attempts.values()) >= 1)
            forget(db, VICTIM)
            adjust(api, ops, KEEPER, 2)
            wait_for(lambda: KEEPER in dead_letter_users(db), 30)  # the keeper's gave up
        assert dead_letter_users(db) == [KEEPER]
        assert receiver.bodies() == []
    finally:
        receiver.close()


def test_a_replay_never_sends_a_dead_letter_of_an_erased_member(
    api: TestClient, db: Database, make_key: Callable[..., dict[str, str]]
) -> None:
    """However a dead letter of the member came to exist after the erasure (parked by a
    process that checked just before it), the replay checks again and deletes it."""
    ops, feed = make_key("operator", "ops"), make_key("feed", "f")
    receiver = Receiver()
    try:
        sid = subscribe(api, ops, receiver.url, ["member.adjusted"])["subscription_id"]
        adjust(api, ops, VICTIM, 1)
        adjust(api, ops, KEEPER, 2)
        events = api.get("/v1/feed", params={"limit": 100}, headers=feed).json()["events"]
        feed_events = {e["user_id"]: e for e in events if e["type"] == "member.adjusted"}
        forget(db, VICTIM)
        from datetime import datetime

        from loyalty.application.delivery import FeedEvent

        store = SqlDeliveryStore(db)
        for user in (VICTIM, KEEPER):
            e = feed_events[user]
            at = datetime.fromisoformat(e["occurred_at"].replace("Z", "+00:00"))
            event = FeedEvent(e["id"], 1, e["type"], e["user_id"], at, e["data"])
            store.add_dead_letter(sid, event, 5, "HTTP 503")
        from loyalty.bootstrap import webhook_sender

        admin = api.app.state.container.webhooks  # type: ignore[attr-defined]
        sender = webhook_sender(db.settings)
        try:
            assert admin.replay(sender)[0] == 1
        finally:
            sender.close()
        assert [b["user_id"] for b in receiver.bodies()] == [KEEPER]
        assert dead_letter_users(db) == []
    finally:
        receiver.close()


def test_the_feed_never_returns_an_erased_members_events(
    api: TestClient, db: Database, make_key: Callable[..., dict[str, str]]
) -> None:
    """The pull feed: a reader polling while the erasure runs (its "receiver" failing:
    it does not read) gets, after completion, none of the member's events. A page read
    before the deletion and filtered after it drops them too (the feed asks the
    markers after reading)."""
    feed = make_key("feed", "f")
    ops = make_key("operator", "ops")
    adjust(api, ops, VICTIM, 1)
    adjust(api, ops, KEEPER, 2)
    container = api.app.state.container  # type: ignore[attr-defined]
    reader = container.feed()
    forget(db, VICTIM)
    events = api.get("/v1/feed", params={"limit": 100}, headers=feed).json()["events"]
    assert {e["user_id"] for e in events} == {KEEPER}
    # an erasure marker set while a page is in hand: the same read, asked again, drops it
    adjust(api, ops, "late", 3)
    service = build_forget_service(db)
    service.request("late")  # marker set; the stream is not deleted yet
    page = reader.read(0, 100)
    assert "late" not in {e.user_id for e in page.events}
    assert service.run_pending() == 1


# -- the relay, behind a connection that is down while the erasure runs -------------------


class Proxy:
    """A TCP proxy on 127.0.0.1 to the real broker. ``stall()`` cuts every open connection
    and holds new ones unanswered (the relay's broker failing: its reconnect hangs in the
    handshake) until ``resume()``."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.open = threading.Event()
        self.open.set()
        self.held = 0
        self.conns: list[socket.socket] = []
        self.lock = threading.Lock()
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        if not self.open.is_set():
            with self.lock:
                self.held += 1
            self.open.wait()
        upstream = socket.create_connection(self.target)
        with self.lock:
            self.conns += [client, upstream]
        for a, b in ((client, upstream), (upstream, client)):
            threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.close()
                except OSError:
                    pass

    def stall(self) -> None:
        self.open.clear()
        with self.lock:
            conns, self.conns = self.conns, []
        for s in conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
                s.close()
            except OSError:
                pass

    def resume(self) -> None:
        self.open.set()

    def close(self) -> None:
        self.stall()
        self.open.set()
        self.server.close()


def test_the_relay_failing_during_the_erasure_publishes_none_of_the_members_events(
    api: TestClient, db: Database, make_key: Callable[..., dict[str, str]], amqp_url: str
) -> None:
    from urllib.parse import urlsplit

    from tests.e2e.test_relay import Consumer

    parts = urlsplit(amqp_url)
    proxy = Proxy((parts.hostname or "127.0.0.1", parts.port or 5672))
    exchange = f"test-erasure-{uuid.uuid4().hex[:8]}"
    consumer = Consumer(amqp_url, exchange)
    proxied = amqp_url.replace(f"{parts.hostname}:{parts.port or 5672}", f"127.0.0.1:{proxy.port}")
    ops = make_key("operator", "ops")
    loop = build_relay(db, proxied, exchange=exchange, batch_size=50)
    thread = threading.Thread(target=loop.run, args=((), 0.05, 0.2), daemon=True)
    try:
        adjust(api, ops, "first", 0)
        thread.start()
        # the relay has run (its cursor exists: it is owed member.forgotten notices)
        wait_for(lambda: SqlDeliveryStore(db).cursors().get("relay", 0) > 0)
        proxy.stall()
        adjust(api, ops, VICTIM, 1)
        adjust(api, ops, KEEPER, 2)
        # the relay read the batch, lost its connection, and hangs reconnecting with the
        # victim's events in hand (it may read the batch again before: still before)
        wait_for(lambda: proxy.held >= 1)
        forget(db, VICTIM)
        proxy.resume()

        def published() -> set[tuple[str, str]]:
            consumer.drain()
            return {(m[2]["user_id"], m[2]["type"]) for m in consumer.messages}

        owed = {(VICTIM, "member.forgotten"), (KEEPER, "member.adjusted")}
        wait_for(lambda: owed <= published(), 30)
        bodies = [m[2] for m in consumer.messages]
        assert victim_events(bodies) == []
        assert [b["type"] for b in bodies if b["user_id"] == VICTIM] == ["member.forgotten"]
    finally:
        loop.stop()
        thread.join(timeout=20)
        proxy.close()
        consumer.close()
