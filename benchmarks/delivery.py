"""Events out: the feed's read rate against reading the notification log directly (same
run, same database), the relay's publish rate against a bare publish loop (same broker,
like for like: see ``_relay``), and the webhook fan-out rate to 8 local receivers.

    .venv/bin/python -m benchmarks.run --only delivery
"""

from __future__ import annotations

import os
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
from loyalty.application.delivery import RetryPolicy
from loyalty.bootstrap import build_webhook_dispatcher, event_feed
from loyalty.config import Settings
from loyalty.domain.ranks import Rank, RankLadder

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
    feed = event_feed(members)
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


def _feed_messages(feed: Any, head: int) -> int:
    """How many messages the feed holds up to notification ``head``."""
    total, after = 0, 0
    while after < head:
        page = feed.read(after, 1000)
        total += len(page.events)
        if page.position <= after:
            break
        after = page.position
    return total


def _relay(db: Database, members: Members, n: int) -> dict[str, Any]:
    """The relay against a bare publisher, like for like: the same broker, a durable
    queue bound to the exchange (the broker keeps every message), persistent messages,
    publisher confirms (each publish waits for the broker's ack), the body serialised
    inside the timed loop, connecting and declaring before the clock on both sides.
    Interleaved, best of two each (other work on the box comes and goes).

    - ``relay_send_per_s``: ``AmqpSink.send`` of the feed's first ``n`` events (read
      before);
    - ``bare_publish_per_s``: ``basic_publish`` of the same events' bodies, persistent,
      with ``message_id`` and ``type``, on a channel in confirm mode;
    - ``relay_loop_per_s``: the relay as it runs, ``CursorLoop.step`` from cursor 0 until
      caught up with the log: feed pages read, published, the cursor saved after each.

    Every side's messages are counted in the queue afterwards."""
    import pika
    import pika.exceptions

    from loyalty.adapters.amqp_relay import AmqpSink
    from loyalty.application.delivery import CursorLoop

    try:
        pika.BlockingConnection(pika.URLParameters(AMQP_URL)).close()
    except pika.exceptions.AMQPError as exc:
        if os.environ.get("CI"):
            raise RuntimeError(f"RabbitMQ is required in CI and unreachable: {exc!r}") from exc
        return {"relay": f"skipped: RabbitMQ unreachable ({type(exc).__name__})"}
    feed = event_feed(members)
    events = feed.read(0, n).events
    tag = uuid.uuid4().hex[:8]
    exchange, queue = f"loyalty.bench.{tag}", f"loyalty.bench.{tag}"
    admin = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    try:
        channel = admin.channel()
        channel.exchange_declare(exchange, exchange_type="topic", durable=True)
        channel.queue_declare(queue, durable=True)
        channel.queue_bind(queue, exchange, routing_key="#")

        def queued() -> int:
            return int(channel.queue_declare(queue, passive=True).method.message_count)

        def relay_send() -> float:
            sink = AmqpSink(AMQP_URL, exchange)
            try:
                sink.send([])  # connected, exchange declared, confirm mode on
                started = time.perf_counter()
                sink.send(events)
                return time.perf_counter() - started
            finally:
                sink.close()

        def bare_publish() -> float:
            bare = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
            try:
                bare_channel = bare.channel()
                bare_channel.exchange_declare(exchange, exchange_type="topic", durable=True)
                bare_channel.confirm_delivery()
                started = time.perf_counter()
                for e in events:
                    bare_channel.basic_publish(
                        exchange,
                        e.type,
                        orjson.dumps(e.body()),
                        pika.BasicProperties(
                            delivery_mode=pika.DeliveryMode.Persistent,
                            message_id=e.id,
                            type=e.type,
                        ),
                    )
                return time.perf_counter() - started
            finally:
                bare.close()

        times: dict[str, list[float]] = {"relay": [], "bare": []}
        for side in ("relay", "bare", "bare", "relay"):
            before = queued()
            times[side].append(relay_send() if side == "relay" else bare_publish())
            if queued() - before != len(events):
                raise RuntimeError(f"{side}: queued {queued() - before} of {len(events)}")
            channel.queue_purge(queue)

        # the relay loop as it runs (its own cursor), sink connected before the clock
        loop_sink = AmqpSink(AMQP_URL, exchange)
        store = SqlDeliveryStore(db)
        cursor = f"bench-relay-{tag}"
        loop = CursorLoop(cursor, feed, store, loop_sink, batch_size=500)
        head = feed.head()
        try:
            loop_sink.send([])
            started = time.perf_counter()
            for _ in range(head + 1):  # bounded: at least one event per step
                if loop.step() == 0:
                    break
            loop_s = time.perf_counter() - started
        finally:
            loop_sink.close()
        looped, in_queue = store.cursor(cursor), queued()
        channel.queue_delete(queue)
        channel.exchange_delete(exchange)
    finally:
        admin.close()
    messages = _feed_messages(feed, head)  # a new member's one notification is 3 messages
    if looped != head or in_queue != messages:
        raise RuntimeError(
            f"the relay loop moved to {looped} of {head}, queued {in_queue} of {messages}"
        )
    send_s, bare_s = min(times["relay"]), min(times["bare"])
    return {
        "relay_messages": len(events),
        "relay_send_per_s": _rate(len(events), send_s),
        "bare_publish_per_s": _rate(len(events), bare_s),
        "relay_send_vs_bare": round(bare_s / send_s, 3) if send_s else None,
        "relay_rounds_s": {k: [round(x, 3) for x in v] for k, v in times.items()},
        "relay_loop_messages": head,
        "relay_loop_per_s": _rate(head, loop_s),
        "relay_loop_vs_bare": round((head / loop_s) / (len(events) / bare_s), 3)
        if loop_s and bare_s
        else None,
        "relay_how": (
            "durable queue bound (#), persistent messages, publisher confirms, body "
            "serialised in the loop, connect/declare outside the clock on every side; "
            "relay/bare interleaved, best of two; counted in the queue after each"
        ),
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


def _isolation(db: Database, members: Members, slow: float, seconds: float) -> dict[str, Any]:
    """8 subscriptions while events commit at a steady rate; the first receiver answers
    after ``slow`` seconds (5 s; 0: at once). Returns the p99 delivery latency (arrival -
    commit) at the other 7."""
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
        ThreadingHTTPServer(("127.0.0.1", 0), handler(slow if i == 0 else 0.0, i != 0))
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
    n_members = ctx.pick(smoke=50, quick=500, full=5000)
    per_member = ctx.pick(smoke=4, quick=20, full=40)
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
        result.update(_relay(db, members, ctx.pick(smoke=300, quick=2_000, full=5_000)))
        result.update(_fan_out(db, members, 8, head))
        seconds = ctx.pick(smoke=0.5, quick=4.0, full=10.0)
        slow = ctx.pick(smoke=0.5, quick=5.0, full=5.0)
        result["isolation_all_healthy"] = _isolation(db, members, 0.0, seconds)
        result["isolation_one_slow_5s"] = _isolation(db, members, slow, seconds)
        result["isolation_slow_receiver_s"] = slow
        return result
    finally:
        db.dispose()
        members.close()
