"""Domain events out: one ordered feed of committed account events, and one cursor loop
that carries it to every way out (pull feed, webhooks, the RabbitMQ relay).

The event store is the outbox. Every committed account event has a notification id in
the Members application's notification log; the feed reads that log the way the read
models' projection does (``loyalty.application.projections``): only up to the highest id
seen *before* reading, so on PostgreSQL (stored events inserted under ``LOCK TABLE ... IN
EXCLUSIVE MODE``) and on SQLite (one writer) no id below it can still appear, and a
position only ever moves to an id actually read. An event is therefore delivered only
after it committed, and a cursor never passes one that has not.

Each durable way out (a webhook subscription, the relay) owns a cursor (a notification
id). :class:`CursorLoop` reads a batch after its cursor, hands it to a sink that returns
only when the batch is durable elsewhere (a 2xx answer or a dead letter; broker
confirms), then moves the cursor to the batch's end: at least once, in commit order (so
in order per member), duplicates only for the batch in flight when the process died.

A forgotten member's events are deleted from the log by forget-me, so the feed stops
returning them. Events read before the deletion may still be held in memory (a batch a
webhook retries for hours) or parked (a dead letter): every way out asks the erasure
markers again at the moment it sends, parks or replays (:class:`ErasureCheck`) and drops
the events of an erased stream. Forget-me leaves one ``member.forgotten`` notice (the user
id only) per durable way out; a loop delivers its notices after each batch and deletes
them.
"""

from __future__ import annotations

import base64
import binascii
import logging
import random
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any, Protocol
from uuid import NAMESPACE_URL, UUID, uuid5

from eventsourcing.domain import Aggregate

from loyalty.domain.member import Member

log = logging.getLogger(__name__)

TOMBSTONE = "loyalty.erasure:Tombstone"
EVENT_NAMESPACE = uuid5(NAMESPACE_URL, "urn:loyalty:feed-event")
BOOKKEEPING = frozenset({"originator_id", "originator_version", "timestamp", "originator_topic"})
FORGOTTEN = "member.forgotten"
MAX_LIMIT = 1000
MAX_WAIT_SECONDS = 30.0


def feed_type(class_name: str) -> str:
    """``RankChanged`` -> ``member.rank_changed`` (events are mapped by class name, so
    a new field on an event never breaks the feed)."""
    return "member." + re.sub(r"(?<!^)(?=[A-Z])", "_", class_name).lower()


def member_event_types() -> tuple[str, ...]:
    """The feed types of the Member aggregate's events (``member.created`` first, then
    in the order the classes are defined): every event class nested in ``Member`` that
    no other one extends (``SourcedEvent`` is a base, not an event)."""
    classes = [
        v for v in vars(Member).values() if isinstance(v, type) and issubclass(v, Aggregate.Event)
    ]
    leaves = [c for c in classes if not any(o is not c and issubclass(o, c) for o in classes)]
    names = [c.__name__ for c in leaves]
    names.sort(key=lambda n: n != "Created")
    return tuple(feed_type(n) for n in names)


EVENT_TYPES: tuple[str, ...] = (*member_event_types(), FORGOTTEN)
"""Every type a way out carries: one list for the API schema, the console, the feed and
the docs (tests/e2e/test_event_types.py ties them)."""


def event_id(position: int, member_id: str, version: int) -> str:
    """A stable id per stored event: the same on every read and every way out."""
    return str(uuid5(EVENT_NAMESPACE, f"{position}:{member_id}:{version}"))


def forgotten_event_id(request_id: str) -> str:
    return str(uuid5(EVENT_NAMESPACE, f"forgotten:{request_id}"))


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        items = [_jsonable(v) for v in value]
        return sorted(items, key=repr) if isinstance(value, set | frozenset) else items
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, UUID):
        return str(value)
    if isinstance(value, Decimal):
        return _plain_decimal(str(value))
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if hasattr(value, "__dict__"):
        return _jsonable(vars(value))
    return str(value)


def _plain_decimal(text: str) -> str:
    """``"-0"``/``"-0.00"`` (a negative zero stored by older awards) -> ``"0"``/``"0.00"``."""
    if text.startswith("-"):
        try:
            if Decimal(text).is_zero():
                return text[1:]
        except InvalidOperation:
            pass
    return text


DECIMAL_FIELDS = frozenset({"fraction_currency", "fraction_rank_points"})


@dataclass(frozen=True, slots=True)
class FeedEvent:
    id: str
    position: int
    """The notification id (0 for a member.forgotten notice, which is not in the log)."""
    type: str
    user_id: str
    occurred_at: datetime
    data: dict[str, Any]

    def body(self) -> dict[str, Any]:
        """The wire form (feed item, webhook body, relay message)."""
        return {
            "id": self.id,
            "type": self.type,
            "user_id": self.user_id,
            "occurred_at": self.occurred_at.isoformat().replace("+00:00", "Z"),
            "data": self.data,
        }


@dataclass(frozen=True, slots=True)
class FeedPage:
    events: list[FeedEvent]
    position: int
    """The position after this page: pass it back (as the cursor) for the next one."""
    head: int
    """The newest notification id when the page was read."""


def encode_cursor(position: int) -> str:
    return base64.urlsafe_b64encode(f"feed.v1.{position}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str | None) -> int:
    """The position of an opaque cursor (None or "" = from the start)."""
    if not cursor:
        return 0
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise ValueError("not a feed cursor") from None
    prefix, _, number = text.rpartition(".")
    if prefix != "feed.v1" or not number.isdigit() or len(number) > 19:
        raise ValueError("not a feed cursor")
    return int(number)


class NotificationLog(Protocol):
    """What the feed needs of the library's application recorder."""

    def max_notification_id(self) -> int | None: ...
    def select_notifications(
        self,
        start: int | None,
        limit: int,
        stop: int | None = None,
        topics: Sequence[str] = (),
        *,
        inclusive_of_start: bool = True,
    ) -> Sequence[Any]: ...
    def select_events(
        self,
        originator_id: Any,
        *,
        gt: int | None = None,
        lte: int | None = None,
        desc: bool = False,
        limit: int | None = None,
    ) -> Sequence[Any]: ...


class EventFeed:
    """Committed account events in commit order, read gap-safely from the event store's
    notification log (``members.recorder`` and ``members.mapper``)."""

    USER_CACHE = 100_000

    def __init__(
        self,
        recorder: NotificationLog,
        mapper: Any,
        owner: Any = None,
        erasure: ErasureCheck | None = None,
    ) -> None:
        # ``owner``: the library application the recorder belongs to, kept alive here
        # (an application that is garbage-collected closes its connection pool).
        self._owner = owner
        self._erasure = erasure
        self._recorder = recorder
        self._mapper = mapper
        self._users: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()

    def head(self) -> int:
        return int(self._recorder.max_notification_id() or 0)

    def read(self, after: int, limit: int, types: frozenset[str] | None = None) -> FeedPage:
        """Up to ``limit`` notifications after ``after`` (events of other ``types`` and
        SQLite tombstones are passed over, so a page may hold fewer)."""
        head = self.head()
        if head <= after:
            return FeedPage([], after, head)
        notifications = self._recorder.select_notifications(
            after, limit, stop=head, inclusive_of_start=False
        )
        if not notifications:
            return FeedPage([], after, head)
        decoded = [
            (n.id, self._mapper.to_domain_event(n)) for n in notifications if n.topic != TOMBSTONE
        ]
        created = {
            str(e.originator_id): str(e.user_id)
            for _, e in decoded
            if type(e).__name__ == "Created"
        }
        events = []
        for position, domain_event in decoded:
            kind = feed_type(type(domain_event).__name__)
            if types is not None and kind not in types:
                continue
            member_id = str(domain_event.originator_id)
            user_id = created.get(member_id) or self._user_id(member_id)
            if user_id is None:  # the stream was erased after we read it: not delivered
                continue
            data = {k: _jsonable(v) for k, v in vars(domain_event).items() if k not in BOOKKEEPING}
            data.pop("user_id", None)
            for key in DECIMAL_FIELDS & data.keys():
                if isinstance(data[key], str):
                    data[key] = _plain_decimal(data[key])
            at = domain_event.timestamp
            at = at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)
            version = int(domain_event.originator_version)
            events.append(
                FeedEvent(event_id(position, member_id, version), position, kind, user_id, at, data)
            )
        if events and self._erasure is not None:  # erased while we read: not delivered
            events = drop_erased(self._erasure, events)
        return FeedPage(events, int(notifications[-1].id), head)

    def _user_id(self, member_id: str) -> str | None:
        with self._lock:
            user_id = self._users.get(member_id)
            if user_id is not None:
                self._users.move_to_end(member_id)
                return user_id
        stored = self._recorder.select_events(UUID(member_id), lte=1, limit=1)
        if not stored:
            return None
        user_id = str(self._mapper.to_domain_event(stored[0]).user_id)
        with self._lock:
            self._users[member_id] = user_id
            while len(self._users) > self.USER_CACHE:
                self._users.popitem(last=False)
        return user_id

    def evict(self, member_id: str) -> None:
        """Forget a member's user id (forget-me erased the stream)."""
        with self._lock:
            self._users.pop(member_id, None)

    async def wait_read(
        self,
        after: int,
        limit: int,
        wait: float,
        run: Callable[[Callable[[], FeedPage]], Any],
        sleep: Callable[[float], Any],
        poll: float = 0.2,
    ) -> FeedPage:
        """Long-poll: read; while the page is empty and ``wait`` seconds have not passed,
        sleep ``poll`` and read again. ``run`` runs a read off the event loop (no database
        connection is held while sleeping)."""
        deadline = time.monotonic() + min(max(wait, 0.0), MAX_WAIT_SECONDS)
        while True:
            page: FeedPage = await run(lambda: self.read(after, limit))
            if page.events or page.position != after or time.monotonic() >= deadline:
                return page
            await sleep(min(poll, max(0.0, deadline - time.monotonic())))


# -- the durable ways out -------------------------------------------------------------


class ErasureCheck(Protocol):
    def erased(self, events: Sequence[FeedEvent]) -> set[str]:
        """The ids of ``events`` whose stream a forget-me has erased or is erasing (read
        from the database now, not from a cache): a way out must not carry them."""


def drop_erased(check: ErasureCheck, events: Sequence[FeedEvent]) -> list[FeedEvent]:
    """``events`` without those of erased streams (member.forgotten notices stay)."""
    erased = check.erased([e for e in events if e.type != FORGOTTEN])
    return [e for e in events if e.id not in erased]


@dataclass(frozen=True, slots=True)
class Notice:
    """A member.forgotten notice owed to one way out."""

    notice_id: str
    event: FeedEvent


class CursorStore(Protocol):
    def cursor(self, name: str) -> int: ...
    def save_cursor(self, name: str, position: int) -> None: ...
    def set_failing(self, name: str, error: str | None) -> None:
        """Record that the way out ``name`` is failing (``error``: what, no URL) or, with
        None, that it delivers again (shown by GET /v1/webhooks and the console)."""

    def notices(self, channel: str, limit: int) -> list[Notice]: ...
    def delete_notice(self, notice_id: str) -> None: ...


class Sink(Protocol):
    def send(self, events: Sequence[FeedEvent]) -> None:
        """Return only when every event is durable elsewhere (delivered or dead-lettered);
        raise to have the batch read and sent again."""


class DeliveryMetrics(Protocol):
    def delivery_progress(self, channel: str, *, position: int, head: int) -> None: ...
    def delivery_error(self, channel: str, kind: str) -> None: ...


@dataclass
class CursorLoop:
    """Carries the feed to one way out from its durable cursor."""

    name: str
    feed: EventFeed
    store: CursorStore
    sink: Sink
    types: frozenset[str] | None = None
    batch_size: int = 100
    metrics: DeliveryMetrics | None = None
    stop_event: threading.Event = field(default_factory=threading.Event)

    def step(self) -> int:
        """Deliver one batch (and then any notices); returns how many notifications the
        cursor moved past (0 when caught up)."""
        start = self.store.cursor(self.name)
        page = self.feed.read(start, self.batch_size, self.types)
        if page.events:
            self.sink.send(page.events)
        if page.position != start:
            self.store.save_cursor(self.name, page.position)
        notices = self.store.notices(self.name, self.batch_size)
        if notices and (self.types is None or FORGOTTEN in self.types):
            self.sink.send([n.event for n in notices])
        for notice in notices:
            self.store.delete_notice(notice.notice_id)
        if self.metrics is not None:
            self.metrics.delivery_progress(self.name, position=page.position, head=page.head)
        return page.position - start + len(notices)

    def run(
        self,
        retry_errors: tuple[type[BaseException], ...] = (),
        poll_seconds: float = 0.2,
        max_pause: float = 30.0,
    ) -> None:
        """Deliver until stopped. Any exception (a broken connection, a database error, a
        bug) pauses the loop, doubling up to ``max_pause``, and the batch is read and
        sent again: the loop never dies. Each one is counted; the first of a kind in a
        row is logged (with its traceback unless it is one of ``retry_errors``), and the
        way out is marked failing until a step succeeds."""
        pause = 0.5
        logged: set[str] = set()
        failing = False
        while not self.stop_event.is_set():
            try:
                moved = self.step()
            except InterruptedError:
                continue  # stopped while waiting to retry: the loop condition ends it
            except Exception as exc:  # noqa: BLE001  (logged, counted, backed off: see above)
                kind = type(exc).__name__
                if self.metrics is not None:
                    self.metrics.delivery_error(self.name, kind)
                if kind not in logged:
                    logged.add(kind)
                    log.warning(
                        "delivery %s failing (%s); retrying with backoff",
                        self.name,
                        kind,
                        exc_info=not isinstance(exc, retry_errors),
                    )
                failing = self._mark(f"{kind} (delivery loop)") or failing
                self.stop_event.wait(pause)
                pause = min(pause * 2, max_pause)
                continue
            pause = 0.5
            if failing and not self._sink_failing():
                failing = not self._mark(None)
                logged.clear()
            if moved == 0:
                self.stop_event.wait(poll_seconds)

    def _sink_failing(self) -> bool:
        return bool(getattr(self.sink, "failing", False))

    def _mark(self, error: str | None) -> bool:
        """Record the failing state; True when it was recorded."""
        try:
            self.store.set_failing(self.name, error)
        except Exception:  # noqa: BLE001  (the database is down too: the next step retries)
            return False
        return True

    def stop(self) -> None:
        self.stop_event.set()


# -- webhooks ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Subscription:
    subscription_id: str
    url: str
    event_types: tuple[str, ...]
    secret: str
    created_at: datetime
    failing_since: datetime | None = None
    """Since when its deliveries fail (None: delivering)."""
    last_error: str | None = None
    """What failed last (a status, an error kind; never the URL)."""

    @property
    def channel(self) -> str:
        return f"webhook:{self.subscription_id}"


@dataclass(frozen=True, slots=True)
class DeadLetter:
    letter_id: str
    subscription_id: str
    event: FeedEvent
    attempts: int
    last_error: str
    failed_at: datetime


class WebhookStore(CursorStore, Protocol):
    def add_dead_letter(
        self, subscription_id: str, event: FeedEvent, attempts: int, error: str
    ) -> None: ...
    def dead_letter_count(self) -> int: ...


@dataclass(frozen=True, slots=True)
class Attempt:
    ok: bool
    detail: str
    """The status code or the error."""


class WebhookSender(Protocol):
    def deliver(self, subscription: Subscription, event: FeedEvent) -> Attempt: ...


class WebhookMetrics(DeliveryMetrics, Protocol):
    def webhook_attempt(self, outcome: str, n: int = 1) -> None: ...
    def webhook_dead_letters(self, count: int) -> None: ...


@dataclass
class RetryPolicy:
    """Exponential backoff with full jitter, for at most ``give_up_after`` seconds."""

    first_delay: float = 1.0
    max_delay: float = 300.0
    give_up_after: float = 3 * 3600.0

    def delay(self, attempt: int) -> float:
        return random.uniform(0, min(self.max_delay, self.first_delay * 2 ** (attempt - 1)))


@dataclass
class WebhookSink:
    """Sends a batch to one subscription, event by event in order; an event that fails
    for the whole retry period becomes a dead letter and the next one is sent."""

    subscription: Subscription
    sender: WebhookSender
    store: WebhookStore
    policy: RetryPolicy
    stop_event: threading.Event
    metrics: WebhookMetrics | None = None
    sleep: Callable[[float], Any] | None = None
    erasure: ErasureCheck | None = None
    recheck_after: float = 0.0
    """A first attempt within this many seconds of the last erasure check goes without
    asking again (0: every attempt asks). Safe below forget-me's settle time: an erasure
    whose marker the last check did not see completes no sooner than that after it."""
    failing: bool = False
    """Whether the last attempt failed (the subscription is shown as failing)."""
    _checked: float = 0.0

    def send(self, events: Sequence[FeedEvent]) -> None:
        if self.erasure is not None:
            kept = drop_erased(self.erasure, events)
            self._checked = time.monotonic()
            self._count("erased_dropped", len(events) - len(kept))
            events = kept
        for event in events:
            self._send_one(event)

    def _erased(self, event: FeedEvent, *, first: bool = False) -> bool:
        """Asked before every attempt (a first one may rely on a check of the last
        ``recheck_after`` seconds) and before parking: the event may have been read
        before its member's erasure (then it is dropped, counted)."""
        if self.erasure is None or event.type == FORGOTTEN:
            return False
        now = time.monotonic()
        if first and now - self._checked < self.recheck_after:
            return False
        self._checked = now
        if not self.erasure.erased([event]):
            return False
        self._count("erased_dropped")
        return True

    def _set_failing(self, error: str | None) -> None:
        if self.failing != (error is not None):
            self.store.set_failing(self.subscription.channel, error)
            self.failing = error is not None

    def _send_one(self, event: FeedEvent) -> None:
        started = time.monotonic()
        attempts = 0
        while True:
            if self._erased(event, first=attempts == 0):
                return
            attempts += 1
            result = self.sender.deliver(self.subscription, event)
            if result.ok:
                self._count("delivered")
                self._set_failing(None)
                return
            self._count("failed")
            self._set_failing(result.detail[:200])
            delay = self.policy.delay(attempts)
            if time.monotonic() - started + delay > self.policy.give_up_after:
                if event.type == FORGOTTEN:
                    # A dead letter would keep the erased member's user id: the notice
                    # is given up (counted and logged by event id) instead.
                    self._count("forgotten_dropped")
                    log.warning(
                        "webhook %s: member.forgotten %s given up after %d attempts (%s)",
                        self.subscription.subscription_id,
                        event.id,
                        attempts,
                        result.detail,
                    )
                    return
                if self._erased(event):
                    return
                self.store.add_dead_letter(
                    self.subscription.subscription_id, event, attempts, result.detail
                )
                self._count("dead_lettered")
                log.warning(
                    "webhook %s: event %s dead-lettered after %d attempts (%s)",
                    self.subscription.subscription_id,
                    event.id,
                    attempts,
                    result.detail,
                )
                return
            if self.stop_event.wait(delay):
                raise InterruptedError("delivery stopped")  # the batch is sent again later

    def _count(self, outcome: str, n: int = 1) -> None:
        if self.metrics is not None and n:
            self.metrics.webhook_attempt(outcome, n)


class SubscriptionSource(Protocol):
    def subscriptions(self) -> list[Subscription]: ...


class WebhookDispatcher:
    """One delivery thread per subscription (a slow or dead endpoint holds up only its
    own subscription); re-reads the subscriptions every ``refresh`` seconds."""

    def __init__(
        self,
        feed_factory: Callable[[], EventFeed],
        store: WebhookStore,
        subscriptions: SubscriptionSource,
        sender: WebhookSender,
        *,
        policy: RetryPolicy | None = None,
        retry_errors: tuple[type[BaseException], ...] = (),
        metrics: WebhookMetrics | None = None,
        refresh: float = 2.0,
        poll_seconds: float = 0.2,
        batch_size: int = 20,
        erasure: ErasureCheck | None = None,
        max_pause: float = 30.0,
        recheck_after: float = 0.0,
    ) -> None:
        self._erasure = erasure
        self._recheck_after = recheck_after
        self._max_pause = max_pause
        self._feed_factory = feed_factory
        self._store = store
        self._subscriptions = subscriptions
        self._sender = sender
        self._policy = policy or RetryPolicy()
        self._retry_errors = retry_errors
        self._metrics = metrics
        self._refresh = refresh
        self._poll = poll_seconds
        self._batch = batch_size
        self._loops: dict[str, tuple[CursorLoop, threading.Thread]] = {}
        self.stop_event = threading.Event()

    def sync(self) -> None:
        """Start a loop for each new subscription, stop those of deleted ones."""
        current: Mapping[str, Subscription] = {
            s.subscription_id: s for s in self._subscriptions.subscriptions()
        }
        if self._metrics is not None:
            self._metrics.webhook_dead_letters(self._store.dead_letter_count())
        for sid in list(self._loops):
            if sid not in current:
                loop, _ = self._loops.pop(sid)
                loop.stop()
        for sid, subscription in current.items():
            if sid in self._loops:
                if self._loops[sid][1].is_alive():
                    continue
                log.error("webhook %s: delivery thread ended; restarting it", sid)
                if self._metrics is not None:
                    self._metrics.delivery_error(subscription.channel, "ThreadEnded")
            loop = CursorLoop(
                subscription.channel,
                self._feed_factory(),
                self._store,
                WebhookSink(
                    subscription,
                    self._sender,
                    self._store,
                    self._policy,
                    threading.Event(),
                    self._metrics,
                    erasure=self._erasure,
                    recheck_after=self._recheck_after,
                ),
                types=frozenset(subscription.event_types) or None,
                batch_size=self._batch,
                metrics=self._metrics,
            )
            assert isinstance(loop.sink, WebhookSink)
            loop.sink.stop_event = loop.stop_event
            thread = threading.Thread(
                target=loop.run,
                args=(self._retry_errors, self._poll, self._max_pause),
                name=f"webhook-{sid}",
                daemon=True,
            )
            self._loops[sid] = (loop, thread)
            thread.start()

    def run(self) -> None:
        while not self.stop_event.is_set():
            try:
                self.sync()
            except self._retry_errors as exc:
                log.warning("webhook dispatcher paused (%s)", type(exc).__name__)
            self.stop_event.wait(self._refresh)
        self.close()

    def close(self) -> None:
        for loop, _ in self._loops.values():
            loop.stop()
        for _, thread in self._loops.values():
            thread.join(timeout=10)
        self._loops.clear()

    def stop(self) -> None:
        self.stop_event.set()


class SubscriptionStore(WebhookStore, SubscriptionSource, Protocol):
    def create_subscription(
        self, url: str, event_types: tuple[str, ...], start: int
    ) -> Subscription: ...
    def delete_subscription(self, subscription_id: str) -> bool: ...
    def dead_letters(self, subscription_id: str | None = None) -> list[DeadLetter]: ...
    def delete_dead_letter(self, letter_id: str) -> None: ...


class WebhookAdmin:
    """The operators' use cases: subscribe, list, unsubscribe, see and replay dead
    letters (API and CLI)."""

    def __init__(
        self,
        store: SubscriptionStore,
        head: Callable[[], int],
        check_url: Callable[[str], str],
        erasure: ErasureCheck | None = None,
    ) -> None:
        self._erasure = erasure
        self._store = store
        self._head = head
        self._check_url = check_url

    def create(self, url: str, event_types: Sequence[str] = ()) -> Subscription:
        """A subscription to the events that commit from now on (raises ValueError for a
        refused URL or an unknown event type)."""
        unknown = sorted(set(event_types) - set(EVENT_TYPES))
        if unknown:
            raise ValueError(f"unknown event types: {', '.join(unknown)}")
        self._check_url(url)
        return self._store.create_subscription(url, tuple(dict.fromkeys(event_types)), self._head())

    def subscriptions(self) -> list[Subscription]:
        return self._store.subscriptions()

    def delete(self, subscription_id: str) -> bool:
        return self._store.delete_subscription(subscription_id)

    def dead_letters(self, subscription_id: str | None = None) -> list[DeadLetter]:
        return self._store.dead_letters(subscription_id)

    def dead_letter_count(self) -> int:
        return self._store.dead_letter_count()

    def backlog(self) -> dict[str, int]:
        """Per subscription id: account events committed and not yet delivered (the
        log's head minus the subscription's cursor)."""
        head = self._head()
        return {
            s.subscription_id: max(0, head - self._store.cursor(s.channel))
            for s in self._store.subscriptions()
        }

    def replay(self, sender: WebhookSender, subscription_id: str | None = None) -> tuple[int, int]:
        """Send every dead letter (of one subscription) once more, oldest first; a
        delivered one is deleted, and so is one whose member has been erased since (its
        erasure is checked right before each send). Returns (delivered, still failing)."""
        subscriptions = {s.subscription_id: s for s in self._store.subscriptions()}
        delivered = failed = 0
        for letter in self._store.dead_letters(subscription_id):
            subscription = subscriptions.get(letter.subscription_id)
            if subscription is None:
                continue
            if self._erasure is not None and drop_erased(self._erasure, [letter.event]) == []:
                self._store.delete_dead_letter(letter.letter_id)
                continue
            if sender.deliver(subscription, letter.event).ok:
                self._store.delete_dead_letter(letter.letter_id)
                delivered += 1
            else:
                failed += 1
        return delivered, failed
