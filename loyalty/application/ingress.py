"""Ingest use case: classify a validated batch and append it to the ingress log."""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Protocol


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
class IngestResult:
    accepted: int
    duplicates: int
    rejected: list[Rejection]


class IngressLog(Protocol):
    def append(self, records: Sequence[IngressRecord]) -> int:
        """Store the records not seen before (per source and event id) in one
        transaction; return how many were new."""
        ...


class IngestMetrics(Protocol):
    """Where ingest outcomes are counted (implemented by ``loyalty.observability``)."""

    def ingested(self, source: str, *, accepted: int, duplicates: int, rejected: int) -> None: ...


def shard_of(user_id: str, shard_count: int) -> int:
    """Stable shard of a user (CRC-32 of the UTF-8 user id)."""
    return zlib.crc32(user_id.encode()) % shard_count


def utc_day(moment: datetime) -> date:
    return moment.date()


REASON_TOO_OLD = "too_old"
REASON_IN_FUTURE = "in_future"
# The member asked to be forgotten after this event occurred: it is not stored.
REASON_FORGOTTEN = "forgotten"


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
    ) -> None:
        self._log = log
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
        seen: set[str] = set()
        repeats = 0
        for index, ev in enumerate(events):
            if ev.occurred_at < oldest:
                rejected.append(Rejection(index, ev.event_id, REASON_TOO_OLD))
                continue
            if ev.occurred_at > newest:
                rejected.append(Rejection(index, ev.event_id, REASON_IN_FUTURE))
                continue
            if ev.event_id in seen:
                repeats += 1
                continue
            if self._forgotten_at is not None:
                forgotten = self._forgotten_at(ev.user_id)
                if forgotten is not None and ev.occurred_at <= forgotten:
                    rejected.append(Rejection(index, ev.event_id, REASON_FORGOTTEN))
                    continue
            seen.add(ev.event_id)
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
        inserted = self._log.append(records) if records else 0
        duplicates = repeats + len(records) - inserted
        if self._metrics is not None:
            self._metrics.ingested(
                source, accepted=inserted, duplicates=duplicates, rejected=len(rejected)
            )
        return IngestResult(accepted=inserted, duplicates=duplicates, rejected=rejected)
