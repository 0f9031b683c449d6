"""Webhooks: one cursor loop per subscription (the dispatcher), the sink that sends and
retries each event and parks dead letters, and the operators' use cases."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from loyalty.application.backoff import backoff_delay
from loyalty.application.delivery.cursors import CursorLoop, CursorStore, DeliveryMetrics
from loyalty.application.delivery.feed import (
    EVENT_TYPES,
    FORGOTTEN,
    ErasureCheck,
    EventFeed,
    FeedEvent,
    drop_erased,
)
from loyalty.application.jobs import JobRunner, job_metrics

log = logging.getLogger(__name__)


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
        return backoff_delay(attempt, self.first_delay, self.max_delay, full_jitter=True)


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

    def runner(
        self,
        *,
        try_lease: Callable[[], bool] | None = None,
        release_lease: Callable[[], None] | None = None,
    ) -> JobRunner:
        """The dispatcher on the job runner: :meth:`sync` every ``refresh`` seconds
        (while this process holds the lease, with ``try_lease``: its loss stops every
        loop); when stopped, the loops stop too."""
        return JobRunner(
            "webhooks",
            self.sync,
            interval=self._refresh,
            try_lease=try_lease,
            release_lease=release_lease,
            on_lease_lost=self.close,
            on_end=self.close,
            retry_errors=self._retry_errors,
            metrics=job_metrics(self._metrics),
            stop_event=self.stop_event,
            logger=log,
        )

    def run(self) -> None:
        self.runner().run()

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
