"""Ingest use case: classify a validated batch and append it to the ingress log."""

from __future__ import annotations

import zlib
from collections import Counter
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Protocol

import orjson


@dataclass(frozen=True, slots=True)
class IncomingEvent:
    """One schema-valid event of a batch (``occurred_at`` is UTC)."""

    event_id: str
    user_id: str
    type: str
    occurred_at: datetime
    attributes_json: str


@dataclass(frozen=True, slots=True)
class IngressRecord:
    """What the ingress log stores for one event."""

    shard: int
    source: str
    event_id: str
    user_id: str
    type: str
    occurred_at: datetime
    attributes_json: str


@dataclass(frozen=True, slots=True)
class Rejection:
    index: int
    event_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class Duplicate:
    """An event not stored because its (source, event_id) was seen before: in this batch
    (an earlier index) or stored earlier within the retention window. ``conflict``: the
    earlier event has other content (user_id, type, occurred_at or attributes) -- most
    likely a bug in the client's id generation, and this event is lost unless resent
    under a new id."""

    index: int
    event_id: str
    conflict: bool


@dataclass(frozen=True, slots=True)
class IngestResult:
    accepted: int
    duplicates: int
    rejected: list[Rejection]
    duplicate_events: list[Duplicate] = field(default_factory=list)
    # accepted events whose type no rule of the current rule set weighs: type -> count
    unweighed: dict[str, int] = field(default_factory=dict)

    @property
    def conflicts(self) -> int:
        return sum(1 for d in self.duplicate_events if d.conflict)


@dataclass(frozen=True, slots=True)
class Stored:
    """What an append stored: how many records were new, and for each record that was
    not (by its position in the appended sequence) whether its content differs from the
    stored event of the same key (False when the stored content is not known)."""

    inserted: int
    not_stored: dict[int, bool] = field(default_factory=dict)


class IngressLog(Protocol):
    def store(self, records: Sequence[IngressRecord]) -> Stored:
        """Store the records not seen before (per source and event id) in one
        transaction; say which were not stored and which of those conflict."""
        ...


class IngestMetrics(Protocol):
    """Where ingest outcomes are counted (implemented by ``loyalty.observability``)."""

    def ingested(
        self,
        source: str,
        *,
        accepted: int,
        duplicates: int,
        rejected: int,
        conflicts: int = 0,
        unweighed: dict[str, int] | None = None,
    ) -> None: ...


def same_content(a: IngressRecord | IncomingEvent, b: IngressRecord | IncomingEvent) -> bool:
    """Whether two events of one key say the same thing (attributes compared as JSON
    values, so key order and spacing do not matter)."""
    if a.user_id != b.user_id or a.type != b.type or a.occurred_at != b.occurred_at:
        return False
    return a.attributes_json == b.attributes_json or orjson.loads(
        a.attributes_json
    ) == orjson.loads(b.attributes_json)


def shard_of(user_id: str, shard_count: int) -> int:
    """Stable shard of a user (CRC-32 of the UTF-8 user id)."""
    return zlib.crc32(user_id.encode()) % shard_count


def utc_day(moment: datetime) -> date:
    return moment.date()


REASON_TOO_OLD = "too_old"
REASON_IN_FUTURE = "in_future"
# The member asked to be forgotten after this event occurred: it is not stored.
REASON_FORGOTTEN = "forgotten"
REJECT_REASONS = (REASON_TOO_OLD, REASON_IN_FUTURE, REASON_FORGOTTEN)
"""Every reason an event of a batch is rejected for (the API schema's enum)."""


class IngestService:
    """Reject events outside the acceptance window, drop in-batch repeats, append."""

    def __init__(
        self,
        log: IngressLog,
        *,
        clock: Callable[[], datetime],
        retention: timedelta,
        future_skew: timedelta,
        shard_count: int,
        metrics: IngestMetrics | None = None,
        forgotten_at: Callable[[str], datetime | None] | None = None,
        weighed_types: Callable[[], Collection[str]] | None = None,
    ) -> None:
        self._log = log
        # The event types the current rules weigh (None: not reported).
        self._weighed_types = weighed_types
        # When a forget-me of a user was requested (markers expire with retention).
        self._forgotten_at = forgotten_at
        self._metrics = metrics
        self._clock = clock
        self._retention = retention
        self._future_skew = future_skew
        self._shard_count = shard_count

    def ingest(self, source: str, events: Sequence[IncomingEvent]) -> IngestResult:
        now = self._clock()
        oldest, newest = now - self._retention, now + self._future_skew
        rejected: list[Rejection] = []
        records: list[IngressRecord] = []
        seen: dict[str, int] = {}  # event id -> its index in records
        duplicates: list[Duplicate] = []
        indexes: list[int] = []  # batch index of each record
        for index, ev in enumerate(events):
            if ev.occurred_at < oldest:
                rejected.append(Rejection(index, ev.event_id, REASON_TOO_OLD))
                continue
            if ev.occurred_at > newest:
                rejected.append(Rejection(index, ev.event_id, REASON_IN_FUTURE))
                continue
            first = seen.get(ev.event_id)
            if first is not None:
                conflict = not same_content(records[first], ev)
                duplicates.append(Duplicate(index, ev.event_id, conflict))
                continue
            if self._forgotten_at is not None:
                forgotten = self._forgotten_at(ev.user_id)
                if forgotten is not None and ev.occurred_at <= forgotten:
                    rejected.append(Rejection(index, ev.event_id, REASON_FORGOTTEN))
                    continue
            seen[ev.event_id] = len(records)
            indexes.append(index)
            records.append(
                IngressRecord(
                    shard=shard_of(ev.user_id, self._shard_count),
                    source=source,
                    event_id=ev.event_id,
                    user_id=ev.user_id,
                    type=ev.type,
                    occurred_at=ev.occurred_at,
                    attributes_json=ev.attributes_json,
                )
            )
        stored = self._log.store(records) if records else Stored(0)
        types = Counter(r.type for r in records)
        if stored.not_stored:
            for position, conflict in stored.not_stored.items():
                record = records[position]
                duplicates.append(Duplicate(indexes[position], record.event_id, conflict))
                types[record.type] -= 1
            duplicates.sort(key=lambda d: d.index)
        unweighed: dict[str, int] = {}
        if self._weighed_types is not None:
            weighed = self._weighed_types()
            unweighed = {t: n for t, n in sorted(types.items()) if n > 0 and t not in weighed}
        result = IngestResult(
            accepted=stored.inserted,
            duplicates=len(duplicates),
            rejected=rejected,
            duplicate_events=duplicates,
            unweighed=unweighed,
        )
        if self._metrics is not None:
            self._metrics.ingested(
                source,
                accepted=result.accepted,
                duplicates=result.duplicates,
                rejected=len(rejected),
                conflicts=result.conflicts,
                unweighed=unweighed,
            )
        return result
