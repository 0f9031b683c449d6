"""Currency lots: FIFO spends, refunds into their lots, expiry once per lot, and the
rule that turning expiry on later never expires earlier currency unless asked."""

from __future__ import annotations

import copy
import json
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from eventsourcing.persistence import StoredEvent
from hypothesis import given, settings
from hypothesis import strategies as st

from loyalty.application.accounts import Members
from loyalty.application.commands.rules import parse_rule_set, rule_set_to_wire
from loyalty.domain.errors import InvalidRules
from loyalty.domain.expiry import LEGACY, CurrencyExpiry, add_months, expiring, month_of
from loyalty.domain.member import Member, account_events, allocate, replay
from loyalty.domain.rules import DEFAULT_RULES_WIRE

LADDER = parse_rule_set(copy.deepcopy(DEFAULT_RULES_WIRE), 1).ranks
TWELVE = CurrencyExpiry(after_months=12, effective_from="2000-01")


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def expired(member: Member) -> list[tuple[str, int]]:
    return [
        (e.lot, e.amount) for e in member.collect_events() if type(e).__name__ == "CurrencyExpired"
    ]


@pytest.mark.parametrize(
    ("lot", "after", "expires"),
    [
        ("2024-01", 12, "2025-02-01"),  # end of January 2025
        ("2024-02", 0, "2024-03-01"),  # a leap February: the instant March begins
        ("2023-12", 1, "2024-02-01"),  # across a year end
        ("2024-11", 3, "2025-03-01"),
    ],
)
def test_a_lot_expires_at_the_end_of_the_month_n_months_later(
    lot: str, after: int, expires: str
) -> None:
    rule = CurrencyExpiry(after_months=after, effective_from="2000-01")
    assert rule.expires_at(lot) == at(expires)


@pytest.mark.parametrize(
    ("ops", "lots", "currency"),
    [
        # FIFO: the oldest month is spent first
        ([("earn", "2024-01", 10), ("earn", "2024-02", 5), ("spend", "o1", 12)], {"2024-02": 3}, 3),
        # a refund puts the amount back into the lots it came from
        (
            [
                ("earn", "2024-01", 10),
                ("earn", "2024-02", 5),
                ("spend", "o1", 12),
                ("refund", "o1"),
            ],
            {"2024-01": 10, "2024-02": 5},
            15,
        ),
        # legacy currency (no month) is the oldest
        ([("earn", None, 4), ("earn", "2024-01", 4), ("spend", "o1", 5)], {"2024-01": 3}, 3),
        # a negative adjustment takes the oldest first too
        ([("earn", "2024-01", 10), ("earn", "2024-03", 10), ("adjust", -15)], {"2024-03": 5}, 5),
    ],
)
def test_lot_arithmetic(ops: list[tuple[object, ...]], lots: dict[str, int], currency: int) -> None:
    member = Member(user_id="amy")
    for i, op in enumerate(ops):
        if op[0] == "earn":
            member.award(f"a{i}", int(op[2]), 0, 1, 1, LADDER, month=op[1])  # type: ignore[arg-type]
        elif op[0] == "spend":
            member.spend(str(op[1]), int(op[2]))  # type: ignore[call-overload]
        elif op[0] == "refund":
            member.refund(str(op[1]))
        else:
            member.adjust(f"j{i}", int(op[1]), 0, "fix", LADDER)  # type: ignore[call-overload]
    assert member.lots == lots
    assert member.currency == currency
    assert replay(member.collect_events()).lots == lots


def test_expiry_takes_each_due_lot_once_and_a_replay_takes_nothing() -> None:
    member = Member(user_id="amy")
    member.award("a1", 100, 0, 1, 1, LADDER, month="2024-01")
    member.award("a2", 50, 0, 1, 1, LADDER, month="2024-06")
    member.spend("o1", 30)  # from January
    assert member.expire(TWELVE, at("2025-01-31T23:59:59")) == []
    assert member.expire(TWELVE, at("2025-02-01T00:00:00")) == [("2024-01", 70)]
    assert member.expire(TWELVE, at("2025-02-01T00:00:00")) == []  # the same run again
    assert member.expire(TWELVE, at("2025-06-30T00:00:00")) == []
    assert member.expire(TWELVE, at("2025-07-01T00:00:00")) == [("2024-06", 50)]
    assert member.currency == 0 and member.lots == {}
    assert member.expired_lots == {"2024-01": 70, "2024-06": 50}


def test_a_refund_after_its_lot_expired_expires_at_once() -> None:
    """Decided: the refunded part of an expired lot expires again in the refund itself,
    so the balance is what it would be had the order never been placed."""
    member = Member(user_id="amy")
    member.award("a1", 100, 0, 1, 1, LADDER, month="2024-01")
    member.award("a2", 100, 0, 1, 1, LADDER, month="2024-12")
    member.spend("o1", 130)  # 100 from January, 30 from December
    member.collect_events()
    assert member.expire(TWELVE, at("2025-02-01T00:00:00")) == []  # January was spent
    member.refund("o1", expiry=TWELVE, as_of=at("2025-02-10T00:00:00"))
    assert expired(member) == [("2024-01", 100)]
    assert member.currency == 100 and member.lots == {"2024-12": 100}


def test_turning_expiry_on_later_never_expires_earlier_currency_unless_asked() -> None:
    member = Member(user_id="amy")
    member.award("a0", 7, 0, 1, 1, LADDER)  # legacy: stored before lots were tracked
    member.award("a1", 10, 0, 1, 1, LADDER, month="2024-01")
    member.award("a2", 20, 0, 1, 1, LADDER, month="2024-05")
    on_later = CurrencyExpiry(after_months=1, effective_from="2024-05")
    assert member.expire(on_later, at("2030-01-01T00:00:00")) == [("2024-05", 20)]
    assert member.currency == 17
    asked = CurrencyExpiry(after_months=1, effective_from="2024-05", retroactive=True)
    assert member.expire(asked, at("2024-07-01T00:00:00")) == [("0000-00", 7), ("2024-01", 10)]
    assert member.currency == 0


def test_expiring_lists_the_next_expiries_by_day() -> None:
    lots = {LEGACY: 5, "2024-02": 3, "2024-01": 4}
    assert [(e.amount, e.on.isoformat()) for e in expiring(lots, TWELVE)] == [
        (4, "2025-01-31"),
        (3, "2025-02-28"),
    ]
    assert expiring(lots, None) == []


def test_pending_spanning_a_month_end_credits_each_months_lot() -> None:
    member = Member(user_id="amy")
    months = {"2024-01": Decimal("2.6"), "2024-02": Decimal("1.6")}
    member.record_pending("w1.1.1", Decimal("4.2"), Decimal(0), 2, 1, LADDER, months=months)
    assert member.lots == {"2024-01": 2, "2024-02": 2}
    assert member.fraction_currency == Decimal("0.2")
    # the carried fraction goes in front; a month gets what became whole in it
    assert allocate(Decimal("0.5"), {"2024-02": Decimal("0.6"), "2024-01": Decimal("0.4")}) == {
        "2024-02": 1
    }


MONTHS = [add_months("2024-01", i) for i in range(24)]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.tuples(st.just("earn"), st.sampled_from([None, *MONTHS]), st.integers(0, 50)),
            st.tuples(st.just("spend"), st.integers(1, 60)),
            st.tuples(st.just("refund"), st.integers(0, 20)),
            st.tuples(st.just("expire"), st.sampled_from(MONTHS)),
            st.tuples(st.just("adjust"), st.integers(-40, 40)),
        ),
        max_size=40,
    ),
    st.integers(0, 6),
    st.booleans(),
)
def test_any_sequence_keeps_balance_equal_to_open_lots_and_expires_nothing_twice(
    ops: list[tuple[object, ...]], after: int, retroactive: bool
) -> None:
    rule = CurrencyExpiry(after_months=after, effective_from="2024-03", retroactive=retroactive)
    member = Member(user_id="amy")
    orders: list[str] = []
    credited: dict[str, int] = {}
    for i, op in enumerate(ops):
        if op[0] == "earn":
            month, amount = op[1], int(op[2])  # type: ignore[call-overload]
            member.award(f"a{i}", amount, 0, 1, 1, LADDER, month=month)  # type: ignore[arg-type]
            lot = month or LEGACY
            credited[lot] = credited.get(lot, 0) + amount  # type: ignore[index]
        elif op[0] == "spend":
            amount = int(op[1])  # type: ignore[call-overload]
            if amount <= member.currency:
                oldest_before = sorted(member.lots)
                member.spend(f"o{i}", amount)
                taken = member.order_lots[json.dumps([None, f"o{i}"], separators=(",", ":"))]
                # FIFO: only the last lot taken from may keep some currency
                assert list(taken) == oldest_before[: len(taken)]
                orders.append(f"o{i}")
        elif op[0] == "refund" and orders:
            order = orders[int(op[1]) % len(orders)]  # type: ignore[call-overload]
            member.refund(order, expiry=rule, as_of=month_start_of(MONTHS[-1]))
        elif op[0] == "expire":
            member.expire(rule, month_start_of(str(op[1])))
        elif op[0] == "adjust":
            amount = int(op[1])  # type: ignore[call-overload]
            if member.currency + amount >= 0:
                member.adjust(f"j{i}", amount, 0, "fix", LADDER, month="2024-06")
                if amount > 0:
                    credited["2024-06"] = credited.get("2024-06", 0) + amount
        assert member.currency == sum(member.lots.values()) >= 0
        assert all(amount > 0 for amount in member.lots.values())
    events = member.collect_events()
    seen: dict[str, int] = {}
    for e in events:
        if type(e).__name__ == "CurrencyExpired":
            seen[e.lot] = seen.get(e.lot, 0) + e.amount
    for lot, amount in seen.items():
        # nothing expires twice: never more than was earned into the lot (a refund puts
        # back only what its order took), and only lots the rule lets expire
        assert amount <= credited.get(lot, 0)
        assert rule.expires_at(lot) is not None
    rebuilt = replay(events)
    assert (rebuilt.currency, rebuilt.lots, rebuilt.expired_lots) == (
        member.currency,
        member.lots,
        member.expired_lots,
    )


def month_start_of(month: str) -> datetime:
    return at(f"{month}-01T00:00:00")


def test_month_of_a_last_second_is_that_month() -> None:
    assert month_of(at("2024-02-29T23:59:59.999999")) == "2024-02"
    assert month_of(datetime.fromisoformat("2024-03-01T00:30:00+01:00")) == "2024-02"


# ------------------------------------------------------------------------- rules


def test_rules_default_to_nothing_expiring() -> None:
    rules = parse_rule_set(copy.deepcopy(DEFAULT_RULES_WIRE), 1)
    assert rules.currency_expiry is None
    assert "currency_expiry" not in rule_set_to_wire(rules)


def test_expiry_rules_round_trip_and_are_validated() -> None:
    wire = copy.deepcopy(DEFAULT_RULES_WIRE)
    wire["currency_expiry"] = {"after_months": 12, "at": "month_end", "effective_from": "2026-01"}
    wire["rank_qualification"] = {"period": {"rolling_days": 365}, "grace_days": 30}
    rules = parse_rule_set(wire, 2)
    assert rules.currency_expiry == CurrencyExpiry(12, "2026-01")
    assert parse_rule_set(rule_set_to_wire(rules), 2) == rules
    bad = copy.deepcopy(DEFAULT_RULES_WIRE)
    bad["currency_expiry"] = {"after_months": -1, "at": "day_end", "retroactive": "yes"}
    bad["rank_qualification"] = {"period": "fortnight", "grace_days": 400}
    with pytest.raises(InvalidRules) as caught:
        parse_rule_set(bad, 2)
    locations = {loc for loc, _ in caught.value.problems}
    assert locations == {
        "currency_expiry.after_months",
        "currency_expiry.at",
        "currency_expiry.retroactive",
        "rank_qualification.period",
        "rank_qualification.grace_days",
    }


# ----------------------------------------------------------- stored streams (v3)

STREAM = json.loads((Path(__file__).parent / "member_stream_v3.json").read_text())


def stored(row: list[object]) -> StoredEvent:
    return StoredEvent(
        originator_id=UUID(str(row[0])),
        originator_version=int(row[1]),  # type: ignore[call-overload]
        topic=str(row[2]),
        state=str(row[3]).encode(),
    )


def test_todays_stored_streams_load_with_their_balance_in_the_legacy_lot() -> None:
    """A stream (and a snapshot) stored by the code before lots: the balance is one
    legacy lot, refunds of old orders go back to it, old rank changes say
    ``threshold``, and nothing of it expires under a rule turned on later."""
    app = Members(env={"PERSISTENCE_MODULE": "eventsourcing.popo"})
    app.recorder.insert_events([stored(row) for row in STREAM["rows"]])
    member = app.repository.get(UUID(STREAM["rows"][0][0]))
    assert isinstance(member, Member)
    assert (member.currency, member.lots) == (1150, {LEGACY: 1150})
    events = list(app.events.get(member.id))
    assert [e.reason for e in events if type(e).__name__ == "RankChanged"] == ["threshold"]
    assert member.refund("o-2", "shop") == 100
    assert member.lots == {LEGACY: 1250}
    assert member.expire(CurrencyExpiry(0, "2026-01"), at("2040-01-01T00:00:00")) == []
    # the snapshot of version 3 upcasts the same way
    app2 = Members(env={"PERSISTENCE_MODULE": "eventsourcing.popo"})
    snapshot = app2.mapper.to_domain_event(stored(STREAM["snapshot"]))
    from_snapshot = snapshot.mutate(None)
    assert isinstance(from_snapshot, Member)
    assert (from_snapshot.currency, from_snapshot.lots) == (1150, {LEGACY: 1150})
    assert from_snapshot.order_lots == {'["shop","o-2"]': {LEGACY: 100}}
    assert from_snapshot == app.repository.get(member.id)  # as its events replay


# ------------------------------------------------------------ rank qualification


def qualified_ladder(**qualification: object) -> Any:
    wire = copy.deepcopy(DEFAULT_RULES_WIRE)
    wire["rank_qualification"] = qualification
    return parse_rule_set(wire, 2).ranks


def reasons(member: Member) -> list[tuple[str | None, str | None, str]]:
    return [
        (e.old, e.new, e.reason)
        for stored in member.collect_events()
        for e in account_events(stored)  # a new member's first events are one Enrolled
        if type(e).__name__ == "RankChanged"
    ]


def test_calendar_year_with_grace_keeps_the_rank_until_the_grace_ends() -> None:
    ladder = qualified_ladder(period="calendar_year", grace_days=30)
    member = Member(user_id="amy")
    member.award("a1", 0, 1000, 1, 1, ladder, on="2024-03-01")  # silver at 1,000
    assert reasons(member) == [(None, "silver", "threshold")]
    q = ladder.qualification
    assert q.valid_until(member.rank_days, date(2024, 3, 1), 1000) == date(2025, 1, 30)
    assert member.requalify(ladder, at("2024-12-31T23:59:59")) is False
    assert member.requalify(ladder, at("2025-01-30T23:59:59")) is False  # the grace's last day
    assert member.requalify(ladder, at("2025-01-31T00:00:00")) is True
    assert reasons(member) == [("silver", "bronze", "requalification")]
    assert member.rank_points == 1000  # lifetime rank points stay


def test_a_rolling_window_over_a_leap_day() -> None:
    ladder = qualified_ladder(period={"rolling_days": 365})
    member = Member(user_id="amy")
    member.award("a1", 0, 1000, 1, 1, ladder, on="2024-02-29")
    member.collect_events()
    # the 365 days ending 2025-02-27 start on 2024-02-29
    assert member.requalify(ladder, at("2025-02-27T12:00:00")) is False
    assert member.requalify(ladder, at("2025-02-28T00:00:00")) is True
    assert reasons(member) == [("silver", "bronze", "requalification")]
    # earning again lifts the rank at once
    member.award("a2", 0, 1000, 1, 1, ladder, on="2025-03-01")
    assert reasons(member) == [("bronze", "silver", "threshold")]


def test_without_a_period_ranks_stay_lifetime() -> None:
    member = Member(user_id="amy")
    member.award("a1", 0, 1000, 1, 1, LADDER, on="2024-01-01")
    assert member.requalify(LADDER, at("2030-01-01T00:00:00")) is False
    assert member.rank == "silver"
