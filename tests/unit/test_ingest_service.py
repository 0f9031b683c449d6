"""IngestService and the wire parsing helpers, with an in-memory fake log.

What the log decides (a resend is all duplicates, sources are separate) is tested on the
real logs, SQLite and PostgreSQL: tests/integration/test_ingress_log.py."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import pytest

from loyalty.api.problems import format_loc
from loyalty.application.commands.fields import parse_rfc3339
from loyalty.application.ingress import (
    IncomingEvent,
    IngestService,
    IngressRecord,
    Stored,
    same_content,
    shard_of,
)

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


class FakeLog:
    """Dedups on (source, event_id) like the real logs."""

    def __init__(self) -> None:
        self.rows: dict[tuple[str, str], IngressRecord] = {}

    def store(self, records: Sequence[IngressRecord]) -> Stored:
        new, not_stored = 0, {}
        for i, r in enumerate(records):
            earlier = self.rows.get((r.source, r.event_id))
            if earlier is None:
                self.rows[(r.source, r.event_id)] = r
                new += 1
            else:
                not_stored[i] = not same_content(r, earlier)
        return Stored(new, not_stored)


def service(log: FakeLog) -> IngestService:
    return IngestService(
        log,
        clock=lambda: NOW,
        retention=timedelta(days=7),
        future_skew=timedelta(minutes=5),
        shard_count=16,
    )


def ev(event_id: str, at: datetime = NOW, user: str = "u1") -> IncomingEvent:
    return IncomingEvent(event_id, user, "logged_on", at, "{}")


def test_window_edges_and_in_batch_repeats() -> None:
    log = FakeLog()
    result = service(log).ingest(
        "src",
        [
            ev("old", NOW - timedelta(days=7, microseconds=1)),
            ev("oldest-ok", NOW - timedelta(days=7)),
            ev("future", NOW + timedelta(minutes=5, microseconds=1)),
            ev("future-ok", NOW + timedelta(minutes=5)),
            ev("a"),
            ev("a"),
        ],
    )
    assert (result.accepted, result.duplicates) == (3, 1)
    assert [(r.index, r.event_id, r.reason) for r in result.rejected] == [
        (0, "old", "too_old"),
        (2, "future", "in_future"),
    ]
    assert {k[1] for k in log.rows} == {"oldest-ok", "future-ok", "a"}


def test_shard_is_stable_and_spread() -> None:
    assert shard_of("user-42", 16) == shard_of("user-42", 16)
    assert len({shard_of(f"user-{i}", 16) for i in range(1000)}) == 16


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-11-26T10:00:00Z", datetime(2026, 11, 26, 10, tzinfo=UTC)),
        ("2026-11-26t10:00:00z", datetime(2026, 11, 26, 10, tzinfo=UTC)),
        ("2026-11-26T10:00:00+02:00", datetime(2026, 11, 26, 8, tzinfo=UTC)),
        ("2026-11-26T23:30:00-02:00", datetime(2026, 11, 27, 1, 30, tzinfo=UTC)),
        ("2026-11-26T10:00:00.123456789Z", datetime(2026, 11, 26, 10, 0, 0, 123456, tzinfo=UTC)),
        ("2026-11-26T10:00:00.5+00:00", datetime(2026, 11, 26, 10, 0, 0, 500000, tzinfo=UTC)),
    ],
)
def test_rfc3339_accepted(text: str, expected: datetime) -> None:
    assert parse_rfc3339(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "2026-11-26T10:00:00",  # no offset
        "2026-11-26 10:00:00Z",  # space separator is not RFC 3339's T
        "2026-11-26",
        "1764151200",
        "2026-13-01T00:00:00Z",
        "2026-11-26T10:00:60Z",
        "2026-11-26T10:00:00+2:00",
        "",
    ],
)
def test_rfc3339_rejected(text: str) -> None:
    with pytest.raises(ValueError):
        parse_rfc3339(text)


def test_field_locations_read_like_paths() -> None:
    assert format_loc(("events", 3, "occurred_at")) == "events[3].occurred_at"
    assert format_loc(("events",)) == "events"
    assert format_loc(()) == ""
