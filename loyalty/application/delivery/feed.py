"""The feed: committed account events in commit order, read gap-safely from the event
store's notification log, and the erasure check every way out asks before it sends.

The event store is the outbox. Every committed account event has a notification id in
the Members application's notification log; the feed reads that log the way the read
models' projection does (``loyalty.application.projections``): only up to the highest id
seen *before* reading, so on PostgreSQL (stored events inserted under ``LOCK TABLE ... IN
EXCLUSIVE MODE``) and on SQLite (one writer) no id below it can still appear, and a
position only ever moves to an id actually read. An event is therefore delivered only
after it committed, and a cursor never passes one that has not.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import logging
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any, NamedTuple, Protocol
from uuid import NAMESPACE_URL, UUID, uuid5

import orjson
from eventsourcing.domain import Aggregate

from loyalty.application.collector import cyclic_gc_paused
from loyalty.domain.member import Member, account_events

log = logging.getLogger(__name__)

TOMBSTONE = "loyalty.erasure:Tombstone"
EVENT_NAMESPACE = uuid5(NAMESPACE_URL, "urn:loyalty:feed-event")
BOOKKEEPING = frozenset({"originator_id", "originator_version", "timestamp", "originator_topic"})
FORGOTTEN = "member.forgotten"
MAX_LIMIT = 1000
MAX_WAIT_SECONDS = 30.0


@functools.cache
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
    leaves = [
        c
        for c in classes
        if not any(o is not c and issubclass(o, c) for o in classes)
        and c is not Member.Enrolled  # stored only: read as the events it stands for
    ]
    names = [c.__name__ for c in leaves]
    names.sort(key=lambda n: n != "Created")
    return tuple(feed_type(n) for n in names)


EVENT_TYPES: tuple[str, ...] = (*member_event_types(), FORGOTTEN)
"""Every type a way out carries: one list for the API schema, the console, the feed and
the docs (tests/e2e/test_event_types.py ties them)."""


_NAMESPACE_BYTES = EVENT_NAMESPACE.bytes


def event_id(position: int, member_id: str, version: int, part: int = 0) -> str:
    """A stable id per account event: the same on every read and every way out. ``part``:
    which of the events a stored ``Enrolled`` stands for (0: its ``Created``, or any
    other stored event itself). ``str(uuid5(EVENT_NAMESPACE, name))``, computed without
    building a ``UUID`` (a sixth of a feed read's time; tests/unit/test_feed_ids.py)."""
    name = (
        f"{position}:{member_id}:{version}:{part}" if part else f"{position}:{member_id}:{version}"
    )
    digest = bytearray(hashlib.sha1(_NAMESPACE_BYTES + name.encode()).digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x50  # version 5
    digest[8] = (digest[8] & 0x3F) | 0x80  # the RFC 4122 variant
    h = digest.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def forgotten_event_id(request_id: str) -> str:
    return str(uuid5(EVENT_NAMESPACE, f"forgotten:{request_id}"))


_PLAIN = frozenset({str, int, float, bool})


def _jsonable(value: Any) -> Any:
    if value is None or type(value) in _PLAIN:  # most fields: no isinstance chain
        return value
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
JSON_TEXT_FIELDS = frozenset({"lots"})
"""Fields the event store keeps as JSON text (event attributes stay plain values) that
the wire carries as what they are: ``"lots": {"2026-12": 11}``, not a string."""


_DECIMAL_KEYS = tuple(sorted(DECIMAL_FIELDS))
_JSON_TEXT_KEYS = tuple(sorted(JSON_TEXT_FIELDS))


def wire_data(out: dict[str, Any]) -> dict[str, Any]:
    """An event's fields as the ways out carry them (the schemas in docs/events/): plain
    JSON values, decimals as exact strings never signed zero, JSON text as JSON. Made of
    ``out`` itself, not a copy: a :class:`StoredItem`'s fields, read for one page and
    held by no one else. (Once per event on every way out: each known field looked up,
    no set built per event.)"""
    out.pop("user_id", None)
    for key in _DECIMAL_KEYS:
        value = out.get(key)
        if type(value) is str and value.startswith("-"):  # only a sign can be a signed zero
            out[key] = _plain_decimal(value)
    for key in _JSON_TEXT_KEYS:
        value = out.get(key)
        if type(value) is str:
            out[key] = orjson.loads(value)  # stdlib json: 30 % of a feed read (py-spy)
    return out


class FeedEvent(NamedTuple):
    """One account event as every way out carries it (a named tuple: built once per
    event on every way out, a fifth of a frozen dataclass's cost)."""

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


NotificationSelect = Callable[[int, int, int], Sequence[Any]]
"""``select(after, limit, stop)``: the notifications after ``after`` up to ``stop``, at
most ``limit``, in id order, each with the library's ``Notification`` fields
(``loyalty.adapters.event_store.notification_reader``)."""


def library_select(recorder: NotificationLog) -> NotificationSelect:
    """The library's own read of the log (``select_notifications``) as a select."""

    def select(after: int, limit: int, stop: int) -> Sequence[Any]:
        return recorder.select_notifications(after, limit, stop=stop, inclusive_of_start=False)

    return select


FirstEvents = Callable[[Sequence[UUID]], Sequence[Any]]
"""The stored first event (version 1) of each of many streams, in one read
(``loyalty.adapters.event_store.stream_loader(recorder, first_only=True)``)."""


Decoded = tuple[str, dict[str, Any], datetime]
"""A stored event decoded without the mapper: its class name, its fields (plain JSON
values, as ``_jsonable`` would give them) and its time."""
PlainDecoder = Callable[[Any], Decoded | None]
"""Decodes a stored event (a notification) without building it, or None: then the mapper
decodes it (a stored ``Enrolled``, a field the transcoder encoded, a cipher)."""


def as_utc(at: datetime) -> datetime:
    """``at`` in UTC (a naive time is taken as UTC); a stored time is UTC already, and is
    returned as it is (no new object: once per event on every way out)."""
    if at.tzinfo is UTC:
        return at
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)


class StoredItem(NamedTuple):
    """One account event of a stored notification (a stored ``Enrolled`` is three), each
    field a plain JSON value: what the ways out carry and the export maps."""

    position: int
    part: int
    """Which of the events a stored ``Enrolled`` stands for (0: any other event itself)."""
    name: str
    member_id: str
    version: int
    at: datetime
    fields: dict[str, Any]


def stored_items(n: Any, decode: PlainDecoder | None, mapper: Any) -> list[StoredItem]:
    """The account events notification ``n`` stands for, each field a plain JSON value:
    decoded straight from the stored JSON by ``decode`` where it can (no event object is
    built), else by the library's ``mapper``."""
    position, member_id, version = int(n.id), str(n.originator_id), int(n.originator_version)
    plain = decode(n) if decode is not None else None
    if plain is not None:
        name, fields, at = plain
        return [StoredItem(position, 0, name, member_id, version, at, fields)]
    return [
        StoredItem(
            position,
            part,
            type(e).__name__,
            member_id,
            int(e.originator_version),
            e.timestamp,
            {k: _jsonable(v) for k, v in vars(e).items() if k not in BOOKKEEPING},
        )
        for part, e in enumerate(account_events(mapper.to_domain_event(n)))
    ]


class EventFeed:
    """Committed account events in commit order, read gap-safely from the event store's
    notification log (``members.recorder`` and ``members.mapper``). A page's members
    whose user id is not cached are looked up together (``first_events``: one read per
    page)."""

    USER_CACHE = 100_000

    def __init__(
        self,
        recorder: NotificationLog,
        mapper: Any,
        owner: Any = None,
        erasure: ErasureCheck | None = None,
        *,
        first_events: FirstEvents,
        decode: PlainDecoder | None = None,
        select: NotificationSelect | None = None,
    ) -> None:
        # ``owner``: the library application the recorder belongs to, kept alive here
        # (an application that is garbage-collected closes its connection pool).
        self._owner = owner
        self._decode = decode
        self._erasure = erasure
        self._recorder = recorder
        self._mapper = mapper
        self._first_events = first_events
        self._select = select or library_select(recorder)
        self._users: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()

    def head(self) -> int:
        return int(self._recorder.max_notification_id() or 0)

    def read(self, after: int, limit: int, types: frozenset[str] | None = None) -> FeedPage:
        """Up to ``limit`` events of the notifications after ``after`` (events of other
        ``types`` and SQLite tombstones are passed over, so a page may hold fewer; a
        stored ``Enrolled`` is its three events, never split, so a page of ``limit`` 1
        or 2 may hold three)."""
        head = self.head()
        if head <= after:
            return FeedPage([], after, head)
        notifications = self._select(after, limit, head)
        if not notifications:
            return FeedPage([], after, head)
        # The page's decoding and building run with the collector paused (they make no
        # reference cycles: tests/unit/test_feed_decoder.py); the reads between do not.
        with cyclic_gc_paused():
            items, taken = self._page_items(notifications, limit)
        last = int(notifications[taken - 1].id)  # the first is always taken
        created = {i.member_id: str(i.fields["user_id"]) for i in items if i.name == "Created"}
        if types is not None:
            items = [i for i in items if feed_type(i.name) in types]
        users = self._user_ids({i.member_id for i in items} - created.keys())
        users.update(created)
        with cyclic_gc_paused():
            events = _feed_events(items, users)
        if events and self._erasure is not None:  # erased while we read: not delivered
            events = drop_erased(self._erasure, events)
        return FeedPage(events, last, head)

    def _page_items(self, notifications: Sequence[Any], limit: int) -> tuple[list[StoredItem], int]:
        """The account events of the first notifications, and how many notifications
        they are. A stored Enrolled is delivered as the Created, Awarded (and
        RankChanged) it stands for: what integrators saw for a new member before it was
        one event. A page ends before the notification that would take it past ``limit``
        events (never splitting one: the first is always taken whole)."""
        decode, mapper = self._decode, self._mapper
        items: list[StoredItem] = []
        taken = 0
        for n in notifications:
            if n.topic != TOMBSTONE:
                parts = stored_items(n, decode, mapper)
                if items and len(items) + len(parts) > limit:
                    break
                items += parts
            taken += 1
        return items, taken

    def _user_ids(self, member_ids: set[str]) -> dict[str, str]:
        """The user id of each of ``member_ids`` whose stream has its first event (an
        erased stream has none: it is left out)."""
        found: dict[str, str] = {}
        missing: list[UUID] = []
        with self._lock:
            for member_id in member_ids:
                user_id = self._users.get(member_id)
                if user_id is None:
                    missing.append(UUID(member_id))
                else:
                    self._users.move_to_end(member_id)
                    found[member_id] = user_id
        if not missing:
            return found
        loaded = {
            str(s.originator_id): str(self._mapper.to_domain_event(s).user_id)
            for s in self._first_events(missing)
        }
        with self._lock:
            for member_id, user_id in loaded.items():
                self._users[member_id] = user_id
            while len(self._users) > self.USER_CACHE:
                self._users.popitem(last=False)
        found.update(loaded)
        return found

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


def _feed_events(items: Sequence[StoredItem], users: dict[str, str]) -> list[FeedEvent]:
    """``items`` as feed events, each with its member's user id (an item whose member
    has none, its stream erased after it was read, is not delivered)."""
    events: list[FeedEvent] = []
    append = events.append
    for position, part, name, member_id, version, at, fields in items:
        user_id = users.get(member_id)
        if user_id is None:
            continue
        append(
            FeedEvent(
                event_id(position, member_id, version, part),
                position,
                feed_type(name),
                user_id,
                as_utc(at),
                wire_data(fields),
            )
        )
    return events


# -- the durable ways out -------------------------------------------------------------


class ErasureCheck(Protocol):
    def erased(self, events: Sequence[FeedEvent]) -> set[str]:
        """The ids of ``events`` whose stream a forget-me has erased or is erasing (read
        from the database now, not from a cache): a way out must not carry them."""


def drop_erased(check: ErasureCheck, events: Sequence[FeedEvent]) -> list[FeedEvent]:
    """``events`` without those of erased streams (member.forgotten notices stay)."""
    erased = check.erased([e for e in events if e.type != FORGOTTEN])
    return [e for e in events if e.id not in erased]
