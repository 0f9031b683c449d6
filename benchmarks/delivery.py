"""Events out: the feed's read rate against reading the notification log directly (same
run, same database), the relay's publish rate with confirms against a bare publish loop
(same broker), and the webhook fan-out rate to 8 local receivers.

    .venv/bin/python -m benchmarks.run --only delivery
"""

from __future__ import annotations

import threading
import time
import uuid
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import orjson

from benchmarks.framework import Context, benchmark
from loyalty.adapters.db import Database
from loyalty.adapters.delivery_store import SqlDeliveryStore
from loyalty.adapters.event_store import event_store_env
from loyalty.application.accounts import Accounts, AwardCommand, Members
from loyalty.application.delivery import EventFeed, RetryPolicy
from loyalty.config import Settings
from loyalty.domain.ranks import Rank, RankLadder
from loyalty.worker import build_webhook_dispatcher

AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
PAGE = 1000


def _write_events(members: Members, n_members: int, per_member: int) -> int:
    accounts = Accounts(members)
    ladder = RankLadder((Rank("base", 0, ()),))
    commands = [
        AwardCommand(f"u{m}", f"a{k}", 1, 1, 1, 1)
        for k in range(per_member)
        for m in range(n_members)
    ]
    for i in range(0, len(commands), 500):
        accounts.award_many(commands[i : i + 500], ladder)
    return int(members.recorder.max_notification_id() or 0)


def _rate(count: int, seconds: float) -> float:
    return round(count / seconds, 1) if seconds > 0 else 0.0


def _feed_vs_log(members: Members) -> dict[str, Any]:
    feed = EventFeed(members.recorder, members.mapper, members)
    started, position, count = time.perf_counter(), 0, 0
    while True:
        page = feed.read(position, PAGE)
        if page.position == position:
            break
        position, count = page.position, count + len(page.events)
    feed_s = time.perf_counter() - started
    started, position, raw = time.perf_counter(), 0, 0
    head = int(members.recorder.max_notification_id() or 0)
    while position < head:
        batch = members.recorder.select_notifications(
            position, PAGE, stop=head, inclusive_of_start=False
        )
        position, raw = batch[-1].id, raw + len(batch)
    log_s = time.perf_counter() - started
    return {
        "feed_events": count,
        "feed_events_per_s": _rate(count, feed_s),
        "log_rows_per_s": _rate(raw, log_s),
        "feed_vs_log": round((count / feed_s) / (raw / log_s), 3) if feed_s and log_s else None,
    }


def _relay(members: Members) -> dict[str, Any]:
    import pika
    import pika.exceptions

    from loyalty.adapters.amqp_relay import AmqpSink

    try:
        pika.BlockingConnection(pika.URLParameters(AMQP_URL)).close()
    except pika.exceptions.AMQPError as exc:
        return {"relay": f"skipped: RabbitMQ unreachable ({type(exc).__name__})"}
    events = EventFeed(members.recorder, members.mapper, members).read(0, 5000).events
    exchange = f"loyalty.bench.{uuid.uuid4().hex[:8]}"
    sink = AmqpSink(AMQP_URL, exchange)
    try:
        started = time.perf_counter()
        sink.send(events)
        confirmed_s = time.perf_counter() - started
    finally:
        sink.close()
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    try:
        channel = connection.channel()
        bodies = [(e.type, orjson.dumps(e.body())) for e in events]
        started = time.perf_counter()
        for key, body in bodies:
            channel.basic_publish(exchange, key, body)
        connection.process_data_events(0)
        bare_s = time.perf_counter() - started
        channel.exchange_delete(exchange)
    finally:
        connection.close()
    return {
        "relay_messages": len(events),
        "relay_confirmed_per_s": _rate(len(events), confirmed_s),
        "bare_publish_per_s": _rate(len(events), bare_s),
    }


def _fan_out(db: Database, members: Members, subscriptions: int, head: int) -> dict[str, Any]:
    received = [0]
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:  # noqa: N802
            self.rfile.read(int(self.headers["content-length"]))
            with lock:
                received[0] += 1
            self.send_response(204)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *_args: Any) -> None:
            pass

    servers = [ThreadingHTTPServer(("127.0.0.1", 0), Handler) for _ in range(subscriptions)]
    for server in servers:
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
    store = SqlDeliveryStore(db)
    n_events = min(head, 2000)
    for server in servers:
        subscription = store.create_subscription(
            f"http://127.0.0.1:{server.server_address[1]}/hook", (), 0
        )
        store.save_cursor(subscription.channel, head - n_events)
    dispatcher = build_webhook_dispatcher(
        db, members, refresh=60, poll_seconds=0.05, policy=RetryPolicy(0.1, 1, 60)
    )
    expected = n_events * subscriptions
    started = time.perf_counter()
    thread = threading.Thread(target=dispatcher.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 300
    while received[0] < expected and time.monotonic() < deadline:
        time.sleep(0.05)
    seconds = time.perf_counter() - started
    dispatcher.stop()
    thread.join(timeout=30)
    for server in servers:
        server.shutdown()
        server.server_close()
    return {
        "webhook_subscriptions": subscriptions,
        "webhook_deliveries": received[0],
        "webhook_deliveries_per_s": _rate(received[0], seconds),
    }


def _isolation(db: Database, members: Members, slow: bool, seconds: float) -> dict[str, Any]:
    """8 subscriptions while events commit at a steady rate; the first receiver answers
    after 5 s when ``slow``. Returns the p99 delivery latency (arrival - commit) at the
    other 7."""
    arrivals: list[float] = []
    lock = threading.Lock()

    def handler(delay: float, record: bool) -> type[BaseHTTPRequestHandler]:
        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802
                body = orjson.loads(self.rfile.read(int(self.headers["content-length"])))
                time.sleep(delay)
                if record:
                    at = datetime.fromisoformat(body["occurred_at"].replace("Z", "+00:00"))
                    with lock:
                        arrivals.append((datetime.now(UTC) - at).total_seconds())
                self.send_response(204)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *_args: Any) -> None:
                pass

        return Handler

    servers = [
        ThreadingHTTPServer(("127.0.0.1", 0), handler(5.0 if slow and i == 0 else 0.0, i != 0))
        for i in range(8)
    ]
    store = SqlDeliveryStore(db)
    for s in store.subscriptions():
        store.delete_subscription(s.subscription_id)
    head = int(members.recorder.max_notification_id() or 0)
    for server in servers:
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        store.create_subscription(
            f"http://127.0.0.1:{server.server_address[1]}/h", ("member.awarded",), head
        )
    dispatcher = build_webhook_dispatcher(
        db, members, refresh=60, poll_seconds=0.05, policy=RetryPolicy(0.1, 1, 60)
    )
    thread = threading.Thread(target=dispatcher.run, daemon=True)
    thread.start()
    time.sleep(0.5)
    accounts = Accounts(members)
    ladder = RankLadder((Rank("base", 0, ()),))
    tag = uuid.uuid4().hex[:6]
    sent, started = 0, time.monotonic()
    while time.monotonic() - started < seconds:
        accounts.award_many([AwardCommand(f"iso{sent % 50}", f"{tag}{sent}", 1, 1, 1, 1)], ladder)
        sent += 1
        time.sleep(0.01)
    deadline = time.monotonic() + 30
    while len(arrivals) < 7 * sent and time.monotonic() < deadline:
        time.sleep(0.05)
    dispatcher.stop()
    thread.join(timeout=30)
    for server in servers:
        server.shutdown()
        server.server_close()
    ordered = sorted(arrivals)
    return {
        "events": sent,
        "healthy_deliveries": len(ordered),
        "p50_ms": round(ordered[len(ordered) // 2] * 1000, 1) if ordered else None,
        "p99_ms": round(ordered[int(len(ordered) * 0.99) - 1] * 1000, 1) if ordered else None,
    }


@benchmark("delivery", order=50)
def delivery(ctx: Context) -> dict[str, object]:
    """Events out: feed vs. notification log, relay with confirms vs. bare, webhook fan-out."""
    n_members = ctx.pick(quick=500, full=5000)
    per_member = ctx.pick(quick=20, full=40)
    url = ctx.new_pg_database("delivery")
    settings = Settings(
        database_url=url, db_pool_size=4, webhook_allow_private_urls=True, snapshot_interval=0
    )
    members = Members(env=event_store_env(settings))
    db = Database(settings)
    try:
        head = _write_events(members, n_members, per_member)
        result: dict[str, object] = {"log_head": head}
        result.update(_feed_vs_log(members))
        result.update(_relay(members))
        result.update(_fan_out(db, members, 8, head))
        seconds = ctx.pick(quick=4.0, full=10.0)
        result["isolation_all_healthy"] = _isolation(db, members, False, seconds)
        result["isolation_one_slow_5s"] = _isolation(db, members, True, seconds)
        return result
    finally:
        db.dispose()
        members.close()
