"""The cursor loop: carries the feed to one durable way out (a webhook subscription, the
relay) from its cursor, on the job runner (``loyalty.application.jobs``)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from loyalty.application.backoff import Backoff
from loyalty.application.delivery.feed import FORGOTTEN, EventFeed, FeedEvent
from loyalty.application.jobs import JobRunner

log = logging.getLogger(__name__)


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


@dataclass(frozen=True, slots=True)
class ChannelErrors:
    """A delivery loop's job metrics: its failures counted by channel and kind
    (``loyalty_delivery_errors_total``); its progress is ``delivery_progress``."""

    channel: str
    metrics: DeliveryMetrics

    def job_succeeded(self, job: str) -> None:
        pass

    def job_failed(self, job: str, kind: str) -> None:
        self.metrics.delivery_error(self.channel, kind)

    def job_failing(self, job: str, failing: bool) -> None:
        pass


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

    def runner(
        self,
        retry_errors: tuple[type[BaseException], ...] = (),
        poll_seconds: float = 0.2,
        max_pause: float = 30.0,
        *,
        try_lease: Callable[[], bool] | None = None,
        release_lease: Callable[[], None] | None = None,
        on_end: Callable[[], None] | None = None,
    ) -> JobRunner:
        """This loop on the job runner: a step as soon as the last one moved the cursor,
        else after ``poll_seconds``. Any exception (a broken connection, a database
        error, a bug) is counted (``delivery_error``), the first of a kind in a row
        logged (with its traceback unless it is one of ``retry_errors``), the way out
        marked failing until a step succeeds, and the batch read and sent again after a
        pause from 0.5 s doubling up to ``max_pause``: the loop never dies."""
        return JobRunner(
            f"delivery {self.name}",
            lambda: 0.0 if self.step() else None,
            interval=poll_seconds,
            try_lease=try_lease,
            release_lease=release_lease,
            on_end=on_end,
            retry_errors=retry_errors,
            backoff=Backoff(0.5, max_pause),
            metrics=ChannelErrors(self.name, self.metrics) if self.metrics is not None else None,
            mark_failing=self._mark,
            stop_event=self.stop_event,
            logger=log,
        )

    def run(
        self,
        retry_errors: tuple[type[BaseException], ...] = (),
        poll_seconds: float = 0.2,
        max_pause: float = 30.0,
    ) -> None:
        """Deliver until stopped (see :meth:`runner`)."""
        self.runner(retry_errors, poll_seconds, max_pause).run()

    def _sink_failing(self) -> bool:
        return bool(getattr(self.sink, "failing", False))

    def _mark(self, kind: str | None) -> bool:
        """Record the failing state (``kind``: what failed; None: delivering again, but
        not while the sink still says it fails); True when it was recorded."""
        if kind is None and self._sink_failing():
            return False
        try:
            self.store.set_failing(self.name, None if kind is None else f"{kind} (delivery loop)")
        except Exception:  # noqa: BLE001  (the database is down too: the next step retries)
            return False
        return True

    def stop(self) -> None:
        self.stop_event.set()
