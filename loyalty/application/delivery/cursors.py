"""The cursor loop: carries the feed to one durable way out (a webhook subscription, the
relay) from its cursor, on the job runner (``loyalty.application.jobs``)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from loyalty.application.delivery.feed import FORGOTTEN, EventFeed, FeedEvent

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
