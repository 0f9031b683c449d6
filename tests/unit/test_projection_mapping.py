"""The projection's pure mapping: Member events -> balance deltas and statement rows."""

from __future__ import annotations

from collections.abc import Collection, Mapping

import pytest
from eventsourcing.domain import Aggregate

from loyalty.api.problems import ApiProblem
from loyalty.api.routes.members import decode_cursor, encode_cursor
from loyalty.application.projections import project
from loyalty.domain.member import Member
from loyalty.domain.ranks import Rank, RankLadder

LADDER = RankLadder((Rank("bronze", 0), Rank("silver", 100)))


def no_lookup(_ids: Collection[str]) -> Mapping[str, str]:
    raise AssertionError("no lookup expected")


def test_a_new_members_events_become_one_insert_and_signed_history() -> None:
    member = Member(user_id="u1")
    member.award("w1", 50, 120, 3, 1, LADDER)
    member.spend("o1", 20)
    member.refund("o1")
    member.adjust("adj", -10, 5, "fix", LADDER)
    events = list(member.collect_events())
    batch = project(7, list(enumerate(events, start=8)), no_lookup)
    assert (batch.start, batch.end) == (7, 8 + len(events) - 1)
    [change] = batch.balances.values()
    assert change.created and change.user_id == "u1"
    assert (change.currency, change.rank_points, change.lifetime_currency) == (40, 125, 40)
    assert change.updated_at == events[-1].timestamp
    # the new member's first three events are one stored Enrolled (version 1): its award
    # and rank lines take positions 0 and 1, below the stream's next event (version 2)
    assert [type(e).__name__ for e in events][:2] == ["Enrolled", "Spent"]
    assert [(h.kind, h.currency, h.rank_points, h.ref, h.position) for h in batch.history] == [
        ("award", 50, 120, "w1", 0),
        ("rank_changed", 0, 0, "silver", 1),
        ("spend", -20, 0, "o1", 2),
        ("refund", 20, 0, "o1", 3),
        ("adjustment", -10, 5, "adj", 4),
    ]


def test_a_stream_stored_before_enrolment_maps_as_it_did() -> None:
    """Created, Awarded and RankChanged stored as three events (before issue 30): the
    same balances and lines, at their versions."""
    member = Member(user_id="u1")
    member.award("w1", 50, 120, 3, 1, LADDER)
    member.spend("o1", 20)
    events = list(Aggregate.collect_events(member))  # as stored before: not compacted
    assert [type(e).__name__ for e in events] == ["Created", "Awarded", "RankChanged", "Spent"]
    batch = project(7, list(enumerate(events, start=8)), no_lookup)
    [change] = batch.balances.values()
    assert change.created and (change.currency, change.rank_points) == (30, 120)
    assert [(h.kind, h.currency, h.ref, h.position) for h in batch.history] == [
        ("award", 50, "w1", 2),
        ("rank_changed", 0, "silver", 3),
        ("spend", -20, "o1", 4),
    ]


def test_later_events_are_deltas_for_a_known_member() -> None:
    member = Member(user_id="u2")
    member.award("w1", 10, 0, 1, 1, LADDER)
    member.collect_events()
    member.spend("o", 4)
    events = list(member.collect_events())
    member_id = str(Member.create_id("u2"))
    asked: list[set[str]] = []

    def lookup(ids: Collection[str]) -> Mapping[str, str]:
        asked.append(set(ids))
        return {member_id: "u2"}

    batch = project(3, [(4, events[0])], lookup)
    assert asked == [{member_id}]
    [change] = batch.balances.values()
    assert not change.created and (change.currency, change.lifetime_currency) == (-4, 0)


def test_an_unknown_stream_is_quarantined_not_silently_skipped() -> None:
    member = Member(user_id="u3")
    member.collect_events()
    member.award("w", 1, 1, 1, 1, LADDER)
    batch = project(0, [(1, member.collect_events()[0])], lambda ids: {})
    assert not batch.balances and not batch.history
    [held] = batch.quarantined
    assert (held.position, held.member_id, held.topic) == (1, str(member.id), "Awarded")
    assert "no balance row" in held.error


def test_cursors_round_trip_and_refuse_forgeries() -> None:
    for position in (1, 2, 57, 10**12):
        assert decode_cursor(encode_cursor(position)) == position
    for bad in ("", "!!", "aDA", "aC0x", "eHl6", encode_cursor(1) + "AAAA"):
        with pytest.raises(ApiProblem):
            decode_cursor(bad)
