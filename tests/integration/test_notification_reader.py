"""The ways out read the notification log with ``notification_reader`` (on PostgreSQL one
binary statement, tuple rows, the stream id as text; on SQLite the library's own read):
row for row what the library's ``select_notifications`` reads, over every kind of event,
a stored ``Enrolled`` (the mapper decodes it from a row whose stream id is text) and the
older stored streams; and the feed and the export over it give, body for body, what
they give over the library's read."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import date, timedelta
from typing import Any

import pytest

from loyalty.adapters.event_store import (
    event_store_env,
    notification_reader,
    plain_decoder,
    stream_loader,
)
from loyalty.application.accounts import Members
from loyalty.application.delivery.feed import EventFeed
from loyalty.application.reporting import MembersLog, account_event_rows
from loyalty.bootstrap import event_feed
from loyalty.config import Settings
from tests.unit.test_feed_decoder import store_every_kind


@pytest.fixture
def members(settings: Settings) -> Iterator[Members]:
    app = Members(env=event_store_env(settings))
    yield app
    app.close()


def _rows(notifications: Any) -> list[tuple[int, str, int, str, bytes]]:
    return [
        (int(n.id), str(n.originator_id), int(n.originator_version), n.topic, bytes(n.state))
        for n in notifications
    ]


def test_the_reader_reads_what_the_library_reads(members: Members) -> None:
    store_every_kind(members)
    recorder = members.recorder
    head = int(recorder.max_notification_id() or 0)
    assert head >= 10
    select = notification_reader(recorder)
    # the whole log, pages of three, a stop below the head, a start at the head
    for after, limit, stop in ((0, 1000, head), (0, 3, head), (4, 3, head), (1, 1000, head - 2)):
        ours = _rows(select(after, limit, stop))
        theirs = _rows(
            recorder.select_notifications(after, limit, stop=stop, inclusive_of_start=False)
        )
        assert ours == theirs
        assert ours and ours[0][0] > after and ours[-1][0] <= stop and len(ours) <= limit
    assert list(select(head, 10, head)) == []


def test_the_feed_over_the_reader_gives_what_it_gives_over_the_library(
    members: Members,
) -> None:
    store_every_kind(members)
    ours = event_feed(members)  # with notification_reader
    theirs = EventFeed(
        members.recorder,
        members.mapper,
        members,
        first_events=stream_loader(members.recorder, first_only=True),
        decode=plain_decoder(members),
    )
    for limit in (1000, 2):
        bodies: list[list[dict[str, Any]]] = [[], []]
        for n, feed in enumerate((ours, theirs)):
            position = 0
            while True:
                page = feed.read(position, limit)
                if page.position == position:
                    break
                position = page.position
                bodies[n].extend(e.body() for e in page.events)
        assert bodies[0] == bodies[1]
        types = {b["type"] for b in bodies[0]}
        assert {"member.created", "member.awarded", "member.rank_changed"} <= types
        assert {"member.spent", "member.refunded", "member.currency_expired"} <= types


def test_the_export_over_the_reader_reads_what_it_reads_over_the_library(
    members: Members,
) -> None:
    store_every_kind(members)
    days = {date(2020, 1, 1) + timedelta(days=d) for d in range(4000)}
    decode = plain_decoder(members)
    ours = MembersLog(members, decode, notification_reader(members.recorder))
    theirs = MembersLog(members, decode)
    rows = list(account_event_rows(ours, b"k" * 32, days, batch=3))
    assert rows == list(account_event_rows(theirs, b"k" * 32, days, batch=3))
    assert {"Created", "Awarded", "RankChanged", "Spent"} <= {r.type for r in rows}
