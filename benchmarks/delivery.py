"""Events out: the feed's read rate against reading the notification log directly (same
run, same database), the relay's publish rate with confirms against a bare publish loop
(same broker), and the webhook fan-out rate to 8 local receivers.

    .venv/bin/python -m benchmarks.run --only delivery
"""

from __future__ import annotations

import threading
import time
import uuid
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
        return result
    finally:
        db.dispose()
        members.close()
