"""Retention: expire whole days of the ingress log, and every row derived from them.

Pure orchestration over :class:`RetentionStore` (SQL for both backends lives in
``loyalty.adapters.retention_store``). A UTC day expires when all of it is older than
``as_of - retention_days``; the first day still inside the window is the *cutoff*.
Per expired day the store removes what the pipeline has processed (PostgreSQL: the whole
day partition, or nothing; SQLite: the processed rows) and reports what it had to keep.
An event the pipeline has not processed is never removed. Daily cap counters go with
their day's ingress: a day kept for its unprocessed events keeps them, because the
pipeline still needs them. PostgreSQL's dedup keys go by generations of receipt days,
once every day they can belong to has expired, and not while any expired day is kept.
Expired forget-me markers go too.

Every destructive step is conditional on the database's state at that moment (no
unprocessed row, no ingress left for the day), not on the lease: two runs at once (a
lease lost with its session) can only both find nothing left to do.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Protocol

from loyalty.application.jobs import JobMetrics, PeriodicJob

log = logging.getLogger("loyalty.retention")


@dataclass(frozen=True, slots=True)
class DroppedDay:
    """A day of ingress removed: its rows and the bytes they took."""

    day: date
    rows: int
    bytes: int


@dataclass(frozen=True, slots=True)
class KeptDay:
    """An expired day kept (wholly or partly) because the pipeline has not processed it."""

    day: date
    unprocessed_rows: int
    reason: str = "unprocessed"


@dataclass(frozen=True, slots=True)
class DayOutcome:
    """What the store did with one expired day."""

    removed_rows: int
    bytes: int
    unprocessed_rows: int
    #: True when the day's storage is gone entirely (partition dropped / no row left).
    removed: bool


@dataclass(slots=True)
class RetentionReport:
    as_of: datetime
    cutoff: date
    backend: str
    dropped: list[DroppedDay] = field(default_factory=list)
    kept: list[KeptDay] = field(default_factory=list)
    cap_rows_deleted: int = 0
    markers_deleted: int = 0
    bytes_reclaimed: int = 0
    #: True when another process holds the retention lease (nothing was done).
    skipped: bool = False
    seconds: float = 0.0

    @property
    def rows_dropped(self) -> int:
        return sum(d.rows for d in self.dropped)

    @property
    def ok(self) -> bool:
        """False when an expired day had to be kept (what ``--strict`` fails on)."""
        return not self.kept and not self.skipped

    def summary(self) -> str:
        if self.skipped:
            return "retention skipped: another process holds the retention lease"
        kept = ", ".join(f"{k.day} ({k.unprocessed_rows} {k.reason})" for k in self.kept)
        if not (self.dropped or self.kept or self.cap_rows_deleted or self.markers_deleted):
            # nothing expired: the space the store's compaction found (e.g. an empty
            # database's free pages after its migrations) is not retention's to report
            return (
                f"retention as of {self.as_of.isoformat()} (keeping days from "
                f"{self.cutoff}): nothing has expired"
            )
        return (
            f"retention as of {self.as_of.isoformat()} (keeping days from {self.cutoff}): "
            f"{len(self.dropped)} day(s) dropped, {self.rows_dropped:,} rows, "
            f"{self.bytes_reclaimed:,} bytes reclaimed; {self.cap_rows_deleted:,} cap rows and "
            f"{self.markers_deleted:,} forget markers deleted" + (f"; KEPT: {kept}" if kept else "")
        )

    def to_wire(self) -> dict[str, object]:
        return {
            "as_of": self.as_of.isoformat(),
            "cutoff": self.cutoff.isoformat(),
            "backend": self.backend,
            "dropped": [
                {"day": d.day.isoformat(), "rows": d.rows, "bytes": d.bytes} for d in self.dropped
            ],
            "kept": [
                {
                    "day": k.day.isoformat(),
                    "unprocessed_rows": k.unprocessed_rows,
                    "reason": k.reason,
                }
                for k in self.kept
            ],
            "cap_rows_deleted": self.cap_rows_deleted,
            "markers_deleted": self.markers_deleted,
            "bytes_reclaimed": self.bytes_reclaimed,
            "skipped": self.skipped,
            "seconds": round(self.seconds, 3),
        }


class RetentionStore(Protocol):
    """The storage side of retention (one implementation per backend)."""

    backend: str

    def lease(self) -> AbstractContextManager[bool]:
        """Hold the retention lease for the block; yields False if another process has it."""
        ...

    def ensure_days(self, days: set[date]) -> None:
        """Make sure ingress can store events of ``days`` without creating storage then."""
        ...

    def expired_days(self, cutoff: date) -> list[date]:
        """Days before ``cutoff`` that still hold ingress storage, oldest first."""
        ...

    def expire_day(self, day: date) -> DayOutcome:
        """Remove the day's processed ingress; never an unprocessed row."""
        ...

    def unrolled_rows(self, day: date) -> int:
        """Rows of the day processed before the daily rollups began (migration 0010):
        their activity is in no rollup, so dropping them loses it from every report."""
        ...

    def delete_caps_before(self, day: date) -> tuple[int, int]:
        """Delete daily cap counters of days before ``day`` that hold no ingress any
        more (never those of a kept day); return how many, and the bytes given back now
        (PostgreSQL drops a day's counters whole; SQLite's go back with :meth:`finish`)."""
        ...

    def delete_expired_markers(self, as_of: datetime) -> int:
        """Delete forget-me markers that expired before ``as_of`` (0 if none exist)."""
        ...

    def expire_keys(self, cutoff: date) -> int:
        """Remove the de-duplication keys that only events of days before ``cutoff`` can
        hold (PostgreSQL: whole generations of them); return the bytes."""
        ...

    def finish(self) -> int:
        """Give freed space back (SQLite: vacuum); return bytes reclaimed by this step."""
        ...


class _Counter(Protocol):
    def inc(self, amount: float = 1) -> None: ...


class _Gauge(Protocol):
    def set(self, value: float) -> None: ...


class RetentionMetrics(Protocol):
    @property
    def retention_partitions_dropped(self) -> _Counter: ...

    @property
    def retention_kept_unprocessed(self) -> _Gauge: ...


#: progress(description, done, total) while a run advances
Progress = Callable[[str, int, int], None]


def cutoff_day(as_of: datetime, retention_days: int) -> date:
    """The first UTC day still inside the window: a day D is expired iff all of it lies
    before ``as_of - retention_days``, i.e. iff D < cutoff."""
    if as_of.tzinfo is None:
        raise ValueError("as_of must be timezone-aware")
    return (as_of - timedelta(days=retention_days)).astimezone(UTC).date()


class Retention:
    def __init__(
        self,
        store: RetentionStore,
        *,
        retention_days: int,
        metrics: RetentionMetrics | None = None,
    ) -> None:
        self._store = store
        self._days = retention_days
        self._metrics = metrics

    def due_days(self, as_of: datetime) -> tuple[date, list[date]]:
        """(cutoff, the ingress days :meth:`run` would expire as of ``as_of``): what
        ``loyalty retention run --dry-run`` shows. Reads only."""
        cutoff = cutoff_day(as_of, self._days)
        return cutoff, self._store.expired_days(cutoff)

    def run(
        self,
        as_of: datetime,
        strict: bool = False,
        progress: Progress | None = None,
        *,
        drop_unrolled: bool = False,
    ) -> RetentionReport:
        """Expire everything older than the window as of ``as_of``.

        ``strict`` only changes the log level of a kept day (the caller decides the exit
        status from ``report.ok``); nothing unprocessed is ever removed either way. A day
        whose rollup is not complete (rows processed before the rollups began) is kept
        and reported too, unless ``drop_unrolled`` (the operator accepts that those
        days' activity is missing from the reports)."""
        started = time.monotonic()
        cutoff = cutoff_day(as_of, self._days)
        report = RetentionReport(as_of=as_of, cutoff=cutoff, backend=self._store.backend)
        note = progress or (lambda _d, _n, _t: None)
        with self._store.lease() as leased:
            if not leased:
                report.skipped = True
                log.info("retention skipped: another process holds the lease")
                return report
            today = as_of.astimezone(UTC).date()
            note("creating partitions ahead", 0, 1)
            self._store.ensure_days({today, today + timedelta(days=1)})
            days = self._store.expired_days(cutoff)
            removed_days = 0
            for i, day in enumerate(days):
                note(f"expiring {day}", i, len(days))
                unrolled = 0 if drop_unrolled else self._store.unrolled_rows(day)
                if unrolled:
                    report.kept.append(KeptDay(day, unrolled, reason="not rolled up"))
                    log.log(
                        logging.ERROR if strict else logging.WARNING,
                        "retention kept expired day %s: %d events processed before the daily "
                        "rollups began (`loyalty retention run --drop-unrolled` drops them)",
                        day,
                        unrolled,
                    )
                    continue
                outcome = self._store.expire_day(day)
                if outcome.removed_rows or outcome.removed:
                    report.dropped.append(DroppedDay(day, outcome.removed_rows, outcome.bytes))
                report.bytes_reclaimed += outcome.bytes
                removed_days += outcome.removed
                if outcome.unprocessed_rows:
                    report.kept.append(KeptDay(day, outcome.unprocessed_rows))
                    level = logging.ERROR if strict else logging.WARNING
                    log.log(
                        level,
                        "retention kept expired day %s: %d events not yet processed",
                        day,
                        outcome.unprocessed_rows,
                    )
            note("deleting derived rows", len(days), len(days))
            if not report.kept:
                # a resend of an event the pipeline has still to process stays a duplicate
                report.bytes_reclaimed += self._store.expire_keys(cutoff)
            report.cap_rows_deleted, freed = self._store.delete_caps_before(cutoff)
            report.bytes_reclaimed += freed
            report.markers_deleted = self._store.delete_expired_markers(as_of)
            note("reclaiming space", len(days), len(days))
            report.bytes_reclaimed += self._store.finish()
        report.seconds = time.monotonic() - started
        if self._metrics is not None:
            if removed_days:
                self._metrics.retention_partitions_dropped.inc(removed_days)
            self._metrics.retention_kept_unprocessed.set(len(report.kept))
        return report


class RetentionJob(PeriodicJob):
    """Runs retention periodically (in the worker) on the job runner: the first run
    shortly after start, then ``interval_seconds`` after each run; a failed run is
    retried with backoff (at most ``interval_seconds`` apart, and at most a minute)."""

    def __init__(
        self,
        retention: Retention,
        *,
        interval_seconds: float,
        clock: Callable[[], datetime],
        first_delay_seconds: float | None = None,
        metrics: JobMetrics | None = None,
    ) -> None:
        super().__init__(
            "retention",
            interval_seconds=interval_seconds,
            first_delay_seconds=first_delay_seconds,
            metrics=metrics,
            logger=log,
        )
        self._retention = retention
        self._clock = clock
        self.last_report: RetentionReport | None = None

    def _once(self) -> None:
        report = self._retention.run(self._clock())
        self.last_report = report
        log.info("%s", report.summary())
