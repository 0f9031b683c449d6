"""Retention's orchestration against a fake store: the window arithmetic, what is
reported, and a periodic job that survives failures."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from datetime import UTC, date, datetime, timedelta, timezone

import pytest

from loyalty.application.retention import (
    DayOutcome,
    DroppedDay,
    KeptDay,
    Retention,
    RetentionJob,
    cutoff_day,
)


def test_a_day_expires_when_all_of_it_is_older_than_the_window() -> None:
    assert cutoff_day(datetime(2030, 3, 11, 6, tzinfo=UTC), 7) == date(2030, 3, 4)
    # exactly midnight: the whole of 2030-03-03 is older than as_of - 7 days
    assert cutoff_day(datetime(2030, 3, 11, 0, tzinfo=UTC), 7) == date(2030, 3, 4)
    # offsets count in UTC
    east = datetime(2030, 3, 11, 1, tzinfo=UTC).astimezone(timezone(timedelta(hours=5)))
    assert cutoff_day(east, 7) == date(2030, 3, 4)
    with pytest.raises(ValueError):
        cutoff_day(datetime(2030, 3, 11), 7)


class FakeStore:
    backend = "fake"

    def __init__(self, days: dict[date, DayOutcome], *, leased: bool = True) -> None:
        self.days = days
        self.leased = leased
        self.ensured: set[date] = set()
        self.caps_before: date | None = None
        self.keys_before: date | None = None
        self.unrolled: dict[date, int] = {}

    @contextmanager
    def _lease(self) -> Iterator[bool]:
        yield self.leased

    def lease(self) -> AbstractContextManager[bool]:
        return self._lease()

    def ensure_days(self, days: set[date]) -> None:
        self.ensured |= days

    def expired_days(self, cutoff: date) -> list[date]:
        return sorted(d for d in self.days if d < cutoff)

    def expire_day(self, day: date) -> DayOutcome:
        return self.days[day]

    def unrolled_rows(self, day: date) -> int:
        return self.unrolled.get(day, 0)

    def delete_caps_before(self, day: date) -> tuple[int, int]:
        self.caps_before = day
        return 7, 8192

    def delete_expired_markers(self, as_of: datetime) -> int:
        return 2

    def expire_keys(self, cutoff: date) -> int:
        self.keys_before = cutoff
        return 30

    def finish(self) -> int:
        return 100


def test_report_lists_dropped_and_kept_days() -> None:
    store = FakeStore(
        {
            date(2030, 3, 1): DayOutcome(10, 1000, 0, True),
            date(2030, 3, 2): DayOutcome(0, 0, 3, False),
            date(2030, 3, 3): DayOutcome(5, 500, 1, False),  # SQLite: partly deleted
            date(2030, 3, 9): DayOutcome(99, 99, 0, True),  # inside the window: untouched
        }
    )
    report = Retention(store, retention_days=7).run(datetime(2030, 3, 11, 6, tzinfo=UTC))
    assert report.dropped == [
        DroppedDay(date(2030, 3, 1), 10, 1000),
        DroppedDay(date(2030, 3, 3), 5, 500),
    ]
    assert report.kept == [KeptDay(date(2030, 3, 2), 3), KeptDay(date(2030, 3, 3), 1)]
    assert not report.ok
    assert report.bytes_reclaimed == 1500 + 8192 + 100 and report.rows_dropped == 15
    assert report.cap_rows_deleted == 7 and report.markers_deleted == 2
    assert store.caps_before == date(2030, 3, 4)
    assert store.keys_before is None  # a day kept: a resend of its events stays a duplicate
    assert store.ensured == {date(2030, 3, 11), date(2030, 3, 12)}
    assert "KEPT" in report.summary() and report.to_wire()["kept"]


def test_the_dedup_keys_expire_when_no_day_is_kept() -> None:
    store = FakeStore({date(2030, 3, 1): DayOutcome(10, 1000, 0, True)})
    report = Retention(store, retention_days=7).run(datetime(2030, 3, 11, 6, tzinfo=UTC))
    assert report.ok and store.keys_before == date(2030, 3, 4)
    assert report.bytes_reclaimed == 1000 + 30 + 8192 + 100  # day, keys, caps, finish


def test_a_day_processed_before_the_rollups_began_is_kept_unless_dropped_on_purpose() -> None:
    store = FakeStore(
        {
            date(2030, 3, 1): DayOutcome(10, 1000, 0, True),
            date(2030, 3, 2): DayOutcome(4, 9, 0, True),
        }
    )
    store.unrolled = {date(2030, 3, 1): 6}
    moment = datetime(2030, 3, 11, 6, tzinfo=UTC)
    report = Retention(store, retention_days=7).run(moment, strict=True)
    assert report.kept == [KeptDay(date(2030, 3, 1), 6, "not rolled up")]
    assert report.dropped == [DroppedDay(date(2030, 3, 2), 4, 9)]
    assert not report.ok and "not rolled up" in report.summary()
    report = Retention(store, retention_days=7).run(moment, drop_unrolled=True)
    assert report.kept == [] and len(report.dropped) == 2 and report.ok


def test_nothing_happens_without_the_lease() -> None:
    store = FakeStore({date(2030, 3, 1): DayOutcome(10, 1000, 0, True)}, leased=False)
    report = Retention(store, retention_days=7).run(datetime(2030, 3, 11, tzinfo=UTC))
    assert report.skipped and report.dropped == [] and not store.ensured


class Flaky:
    """Fails on the first run, then succeeds."""

    def __init__(self) -> None:
        self.calls = 0
        self.inner = Retention(FakeStore({}), retention_days=7)

    def run(self, as_of: datetime, strict: bool = False):  # type: ignore[no-untyped-def]
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("database went away")
        return self.inner.run(as_of)


def test_the_periodic_job_logs_a_failure_and_runs_again(caplog: pytest.LogCaptureFixture) -> None:
    flaky = Flaky()
    job = RetentionJob(
        flaky,  # type: ignore[arg-type]
        interval_seconds=0.01,
        clock=lambda: datetime(2030, 3, 11, tzinfo=UTC),
        first_delay_seconds=0,
    )
    thread = threading.Thread(target=job.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while job.runs < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    job.stop()
    thread.join(timeout=10)
    assert not thread.is_alive()
    assert job.failures == 1 and job.runs >= 2 and job.last_report is not None
    assert "retention failed (RuntimeError: database went away)" in caplog.text
