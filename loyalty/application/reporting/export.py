"""The export: the rollups and the account events handed to a sink (Parquet files),
each member as an HMAC-SHA256 pseudonym under the deployment's export key."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from operator import itemgetter
from typing import Any, NamedTuple, Protocol

from loyalty.application.delivery.feed import (
    TOMBSTONE,
    NotificationSelect,
    PlainDecoder,
    StoredItem,
    as_utc,
    library_select,
    stored_items,
)
from loyalty.application.reporting.report import RollupReader, check_range, daily_report
from loyalty.application.reporting.rollups import EXPIRED_EVENT


def pseudonym(key: bytes, user_id: str) -> str:
    """The keyed pseudonym of a member in exports: HMAC-SHA256 with the deployment's
    export key (hex). Stable across exports (joins work), not reversible without it."""
    return hmac.new(key, user_id.encode(), hashlib.sha256).hexdigest()


DATASETS = ("activity", "accounts", "account_events")


class ExportRefused(Exception):
    """Account events are not exported without the deployment's pseudonym key."""


class AccountEventRow(NamedTuple):
    """One exported account event: the member only as a keyed pseudonym."""

    position: int
    day: date
    member: str
    version: int
    type: str
    at: datetime
    currency: int
    """The signed change of spendable currency."""
    rank_points: int
    ref: str | None
    source: str | None


class EventColumns(NamedTuple):
    """The account events of one page of the log, a column per field of
    :class:`AccountEventRow` but the day (the UTC date of ``at``): an export maps a
    million events, so a page is mapped a column at a time, not a tuple per event."""

    position: Sequence[int]
    member: Sequence[str | None]
    """None: a stream without its ``Created`` (an orphan): no one to name, not exported."""
    version: Sequence[int]
    type: Sequence[str]
    at: Sequence[datetime]
    currency: Sequence[int]
    rank_points: Sequence[int]
    ref: Sequence[str | None]
    source: Sequence[str | None]


class NotificationLog(Protocol):
    """The event store's notification log, decoded (``Members``' recorder and mapper)."""

    def read(self, after: int, limit: int) -> tuple[Sequence[StoredItem], int]:
        """The account events of up to ``limit`` notifications after ``after``, and the
        last notification id read (``after`` when there is none)."""
        ...


class ExportSink(Protocol):
    def complete(self, dataset: str, day: date) -> bool:
        """Whether the day's file of ``dataset`` exists (it appears whole, or not at all)."""
        ...

    def write_rows(self, dataset: str, day: date, rows: Sequence[Mapping[str, Any]]) -> int:
        """Write the day's file of ``dataset`` atomically; returns its bytes."""
        ...

    def write_events(self, days: set[date], pages: Iterable[EventColumns]) -> dict[date, int]:
        """Write one account-event file per day of ``days`` atomically, streaming into them
        the events of ``pages`` whose day (the UTC date of ``at``) is one of ``days`` and
        whose member is named; returns the rows per day."""
        ...


_Change = tuple[int, int, str | None]
"""(signed currency change, rank points, reference) of one account event"""

_CHANGES: dict[str, Callable[[dict[str, Any]], _Change]] = {
    "Created": lambda f: (0, 0, None),
    "Awarded": itemgetter("currency", "rank_points", "award_id"),
    "Spent": lambda f: (-f["amount"], 0, f["order_id"]),
    "Refunded": lambda f: (f["amount"], 0, f["order_id"]),
    "Adjusted": itemgetter("currency", "rank_points", "adjustment_id"),
    "RankChanged": lambda f: (0, 0, f["new"]),
    EXPIRED_EVENT: lambda f: (-int(f["amount"]), 0, f.get("lot")),
}


def _unknown(_fields: dict[str, Any]) -> _Change:
    return (0, 0, None)


def account_event_columns(
    log: NotificationLog, key: bytes, batch: int = 5000
) -> Iterator[EventColumns]:
    """The account events of the whole log, a page at a time, in log order, each member
    as :func:`pseudonym`. The whole log is read (a member's ``Created`` names its user
    id); a forgotten member's stream is gone from the log, so none of its events is
    named."""
    users: dict[str, str] = {}  # stream id -> pseudonym
    changes, unknown = _CHANGES.get, _unknown
    after = 0
    while True:
        page, last = log.read(after, batch)
        if last <= after:
            return
        after = last
        if not page:
            continue
        positions, _, names, streams, versions, ats, fields = zip(*page, strict=True)
        for name, stream, data in zip(names, streams, fields, strict=True):
            if name == "Created":
                users[stream] = pseudonym(key, data["user_id"])
        currency, points, refs = zip(
            *[changes(name, unknown)(data) for name, data in zip(names, fields, strict=True)],
            strict=True,
        )
        yield EventColumns(
            positions,
            [users.get(stream) for stream in streams],
            versions,
            names,
            ats,
            currency,
            points,
            refs,
            [data.get("source") for data in fields],
        )


def account_event_rows(
    log: NotificationLog, key: bytes, wanted: set[date], batch: int = 5000
) -> Iterator[AccountEventRow]:
    """:func:`account_event_columns` a row at a time: the named members' events of the
    ``wanted`` days (their UTC dates), ``at`` in UTC."""
    for page in account_event_columns(log, key, batch):
        for position, member, version, name, at, currency, points, ref, source in zip(
            *page, strict=True
        ):
            at = as_utc(at)
            day = at.date()
            if member is None or day not in wanted:
                continue
            yield AccountEventRow(
                position, day, member, version, name, at, currency, points, ref, source
            )


@dataclass(slots=True)
class ExportResult:
    written: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DATASETS, 0))
    """Files written per dataset."""
    skipped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DATASETS, 0))
    """Days left alone per dataset: final, and already exported."""
    events: int = 0
    bytes: int = 0


def export(
    reader: RollupReader,
    log: NotificationLog,
    sink: ExportSink,
    first: date,
    last: date,
    *,
    key: bytes | None,
    final_before: date,
    events: bool = True,
) -> ExportResult:
    """Export the rollups (and, with ``events``, the account events) of ``first`` ..
    ``last`` as one file per dataset and day. A day before ``final_before`` can no longer
    change (no ingress is accepted for it, no account event is stamped with it): once its
    file exists it is skipped, so an interrupted export resumes where it stopped. Later
    days are written again each time."""
    check_range(first, last)
    if events and key is None:
        raise ExportRefused(
            "account events are exported only with a pseudonym key "
            "(LOYALTY_EXPORT_PSEUDONYM_KEY); export the rollups alone with --rollups-only"
        )
    result = ExportResult()

    def todo(dataset: str, day: date) -> bool:
        if day < final_before and sink.complete(dataset, day):
            result.skipped[dataset] += 1
            return False
        return True

    for day_report in daily_report(reader, first, last):
        day = day_report.day
        if todo("activity", day):
            rows = [
                r.to_wire()
                | {
                    "currency_awarded": r.currency_awarded,
                    "rank_points_awarded": r.rank_points_awarded,
                }
                for r in day_report.activity
            ]
            result.bytes += sink.write_rows("activity", day, rows)
            result.written["activity"] += 1
        if todo("accounts", day):
            wire = day_report.to_wire()
            del wire["activity"], wire["day"]
            wire["currency_awarded"] = day_report.currency_awarded
            wire["rank_points_awarded"] = day_report.rank_points_awarded
            result.bytes += sink.write_rows("accounts", day, [wire])
            result.written["accounts"] += 1
    if not events:
        return result
    assert key is not None
    wanted = set()
    day = first
    while day <= last:
        if todo("account_events", day):
            wanted.add(day)
        day += timedelta(days=1)
    if not wanted:
        return result
    counts = sink.write_events(wanted, account_event_columns(log, key))
    result.written["account_events"] += len(counts)
    result.events = sum(counts.values())
    return result


class MembersLog:
    """:class:`NotificationLog` over the Members application (its recorder and mapper),
    passing over SQLite's forget-me tombstone rows. ``decode``: the stored events' plain
    decoder (``adapters.event_store.plain_decoder``; the mapper decodes what it cannot,
    and every event without it); ``select``: the log's read the feed uses
    (``adapters.event_store.notification_reader``; without it the library's)."""

    def __init__(
        self,
        members: Any,
        decode: PlainDecoder | None = None,
        select: NotificationSelect | None = None,
    ) -> None:
        self._members = members
        self._decode = decode
        self._select = select or library_select(members.recorder)

    def read(self, after: int, limit: int) -> tuple[Sequence[StoredItem], int]:
        recorder = self._members.recorder
        head = int(recorder.max_notification_id() or 0)
        if head <= after:
            return [], after
        notifications = self._select(after, limit, head)
        if not notifications:
            return [], after
        mapper, decode = self._members.mapper, self._decode
        # a stored Enrolled is read as the Created, Awarded (and RankChanged) it stands for
        items = [
            item
            for n in notifications
            if n.topic != TOMBSTONE
            for item in stored_items(n, decode, mapper)
        ]
        return items, int(notifications[-1].id)
