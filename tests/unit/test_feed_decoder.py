"""The feed's decoder of stored events straight from their JSON (``plain_decoder``) gives
every event exactly what the mapper's way gives: the same page, body for body, for every
kind of member event, a stored ``Enrolled``, and streams stored by older versions (their
events upcast). The library's in-memory recorder holds the stored events (no database:
the decoding is pure)."""

from __future__ import annotations

import gc
import json
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from eventsourcing.persistence import StoredEvent

from loyalty.adapters.event_store import plain_decoder
from loyalty.adapters.parquet_export import ParquetSink
from loyalty.application.accounts import Members
from loyalty.application.collector import cyclic_gc_paused
from loyalty.application.delivery.feed import EventFeed
from loyalty.application.reporting import (
    MembersLog,
    account_event_columns,
    account_event_rows,
    pseudonym,
)
from loyalty.domain.expiry import CurrencyExpiry
from loyalty.domain.member import Member
from loyalty.domain.ranks import Rank, RankLadder

LADDER = RankLadder((Rank("bronze", 0, ()), Rank("silver", 100, ("free_shipping",))))
STREAMS = (
    Path(__file__).parent / "domain" / "member_stream_v3.json",
    Path(__file__).parents[1] / "e2e" / "legacy_member_stream_v1.json",
)


@pytest.fixture
def app() -> Any:
    members = Members(env={"PERSISTENCE_MODULE": "eventsourcing.popo"})
    yield members
    members.close()


def _feeds(app: Any) -> tuple[EventFeed, EventFeed]:
    def feed(decode: Any) -> EventFeed:
        return EventFeed(app.recorder, app.mapper, app, first_events=lambda _ids: [], decode=decode)

    decoder = plain_decoder(app)
    assert decoder is not None
    return feed(decoder), feed(None)


def store_every_kind(app: Any) -> Member:
    """Every kind of member event, a stored ``Enrolled``, and the older stored streams."""
    ann = Member(user_id="ann")  # stored as one Enrolled: Created, Awarded, RankChanged
    ann.award("w0.1.1", 120, 150, 3, 1, LADDER, "2026-01", "2026-01-05")
    app.save(ann)
    ann.award("w0.2.1", 7, 3, 1, 2, LADDER, "2026-02", "2026-02-01")
    ann.spend("o1", 50, source="shop")
    ann.refund("o1", refund_id="r1", amount=20, source="shop")
    ann.adjust("a1", -5, 0, "goodwill", LADDER)
    ann.expire(CurrencyExpiry(after_months=1), datetime(2026, 4, 2, tzinfo=UTC))
    app.save(ann)
    for path in STREAMS:  # stored by older versions of the events
        stored = json.loads(path.read_text())["rows"]
        app.recorder.insert_events(
            [StoredEvent(UUID(o), v, topic, state.encode()) for o, v, topic, state in stored]
        )
    return ann


def test_the_decoder_gives_every_event_what_the_mapper_gives(app: Any) -> None:
    store_every_kind(app)
    decoded, mapped = _feeds(app)
    ours, theirs = decoded.read(0, 1000), mapped.read(0, 1000)
    assert ours.position == theirs.position
    assert [e.body() for e in ours.events] == [e.body() for e in theirs.events]
    kinds = {e.type for e in ours.events}
    assert {"member.created", "member.awarded", "member.rank_changed", "member.spent"} <= kinds
    assert {"member.refunded", "member.adjusted", "member.currency_expired"} <= kinds
    assert len({e.user_id for e in ours.events}) == 1 + len(STREAMS)


def test_the_export_reads_with_the_decoder_what_it_reads_with_the_mapper(app: Any) -> None:
    """``loyalty export`` reads the log with the decoder (``MembersLog``): row for row what
    the mapper's way gives, over every kind of event and the older streams (pages of
    three notifications: a stored ``Enrolled`` is never split)."""
    ann = store_every_kind(app)
    days = {date(2020, 1, 1) + timedelta(days=d) for d in range(4000)}  # every event's
    key = b"k" * 32
    ours = list(account_event_rows(MembersLog(app, plain_decoder(app)), key, days, batch=3))
    theirs = list(account_event_rows(MembersLog(app), key, days, batch=3))
    assert ours == theirs
    kinds = {r.type for r in ours}
    assert {"Created", "Awarded", "RankChanged", "Spent", "Refunded", "Adjusted"} <= kinds
    assert "CurrencyExpired" in kinds
    assert len({r.member for r in ours}) == 1 + len(STREAMS)
    # the signed changes of currency add up to the account's balance
    assert sum(r.currency for r in ours if r.member == pseudonym(key, "ann")) == ann.currency


def test_the_decoder_leaves_an_encoded_field_and_an_enrolled_to_the_mapper(app: Any) -> None:
    ann = Member(user_id="ann")
    ann.award("w0.1.1", 1, 1, 1, 1, LADDER)
    app.save(ann)
    decoder = plain_decoder(app)
    assert decoder is not None
    (enrolled,) = app.recorder.select_notifications(0, 10)
    assert decoder(enrolled) is None  # its parts are built by the domain
    encoded = StoredEvent(
        ann.id,
        2,
        "loyalty.domain.member:Member.Spent",
        b'{"timestamp":{"_type_":"datetime_iso","_data_":"2026-01-01T00:00:00+00:00"},'
        b'"order_id":{"_type_":"uuid_hex","_data_":"00000000000000000000000000000001"},'
        b'"amount":1,"source":null,"class_version":2}',
    )
    assert decoder(encoded) is None


def test_an_export_makes_no_reference_cycles(app: Any, tmp_path: Path) -> None:
    """``loyalty export`` pauses the cyclic collector (``cyclic_gc_paused``): safe only
    while an export leaves nothing for it. Every kind of event, read with the decoder and
    with the mapper, written to Parquet files: no cyclic garbage (an export that made
    some would grow with the log while the collector waits)."""
    store_every_kind(app)
    every = {date(2020, 1, 1) + timedelta(days=d) for d in range(4000)}
    days = {r.day for r in account_event_rows(MembersLog(app), b"k" * 32, every)}  # a file each
    gc.collect()
    with cyclic_gc_paused():
        assert not gc.isenabled()
        counts: dict[date, int] = {}
        for log in (MembersLog(app, plain_decoder(app)), MembersLog(app)):
            sink = ParquetSink(tmp_path / str(len(counts)))
            counts.update(sink.write_events(days, account_event_columns(log, b"k" * 32, 3)))
        assert sum(counts.values()) > 10
        assert gc.collect() == 0
    assert gc.isenabled()


def test_a_feed_read_makes_no_reference_cycles(app: Any) -> None:
    """A feed page is decoded and built with the cyclic collector paused
    (``EventFeed.read``): safe only while that leaves nothing for it. Every kind of
    event, read with the decoder and with the mapper, a page of every size down to one
    notification: no cyclic garbage."""
    store_every_kind(app)
    decoded, mapped = _feeds(app)
    gc.collect()
    gc.disable()  # nothing collected while reading: whatever the reads leave is counted
    try:
        bodies = 0
        for feed in (decoded, mapped):
            for limit in (1, 2, 3, 1000):
                position = 0
                while (page := feed.read(position, limit)).position != position:
                    position, bodies = page.position, bodies + len(page.events)
        assert bodies > 40
        assert gc.collect() == 0
    finally:
        gc.enable()
