"""Member.record_pending (issue 16): exact remainders carried, any split gives the floor
of the exact total; events stored before fractions existed load with zero fractions."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from loyalty.domain.member import Member
from loyalty.domain.qualification import RankQualification
from loyalty.domain.ranks import Rank, RankLadder
from loyalty.domain.rules import exact_sum, split_whole

LADDER = RankLadder((Rank("bronze", 0, ()), Rank("silver", 100, ())))
weights = st.decimals(min_value=0, max_value=50, places=3, allow_nan=False, allow_infinity=False)


@given(
    parts=st.lists(st.lists(weights, min_size=1, max_size=5), min_size=1, max_size=12),
)
def test_any_split_into_recordings_credits_the_floor_of_the_exact_total(
    parts: list[list[Decimal]],
) -> None:
    member = Member(user_id="m")
    for i, part in enumerate(parts):
        pending = exact_sum(*part)
        member.record_pending(f"w1.{i + 1}.0", pending, pending, len(part), 1, LADDER)
    total = exact_sum(*(w for part in parts for w in part))
    assert member.currency == member.rank_points == split_whole(total)[0]
    assert member.fraction_currency == split_whole(total)[1]
    assert Decimal(0) <= member.fraction_rank_points < 1


def test_pending_lifting_the_rank_records_it_and_the_need_is_exact() -> None:
    member = Member(user_id="m")
    member.record_pending("w1.1.0", Decimal("10"), Decimal("99.5"), 1, 1, LADDER)
    assert (member.rank_points, member.fraction_rank_points, member.rank) == (
        99,
        Decimal("0.5"),
        "bronze",
    )
    assert member.rank_need(LADDER) == Decimal("0.5")
    assert member.with_pending(Decimal(0), Decimal("0.5")) == (0, 1)
    member.record_pending("w1.2.0", Decimal(0), Decimal("0.5"), 1, 1, LADDER)
    assert (member.rank_points, member.rank) == (100, "silver")
    assert member.rank_need(LADDER) is None
    assert member.record_pending("w1.2.0", Decimal(1), Decimal(1), 1, 1, LADDER) is False


def test_an_award_stored_before_fractions_loads_with_zero_fractions() -> None:
    state: dict[str, Any] = {"award_id": "w1.1.0", "currency": 1}
    Member.Awarded.upcast_v1_v2(state)
    assert state["fraction_currency"] == state["fraction_rank_points"] == "0"
    snapshot: dict[str, Any] = {}
    Member.upcast_v2_v3(snapshot)
    assert snapshot == {"fraction_currency": Decimal(0), "fraction_rank_points": Decimal(0)}


QUALIFIED = RankLadder(
    (Rank("bronze", 0, ()), Rank("silver", 100, ()), Rank("gold", 300, ())),
    RankQualification(rolling_days=30, grace_days=3),
)
START = date(2026, 1, 1)


@given(
    credits=st.lists(st.tuples(st.integers(0, 90), st.integers(0, 200)), min_size=0, max_size=8),
    requalify_on=st.one_of(st.none(), st.integers(0, 140)),
    day=st.integers(0, 140),
    pending=weights.map(lambda w: w * 4),
    fraction=st.decimals(min_value=0, max_value="0.999", places=3),
)
def test_the_rank_need_is_exactly_what_lifts_the_rank_on_its_day(
    credits: list[tuple[int, int]],
    requalify_on: int | None,
    day: int,
    pending: Decimal,
    fraction: Decimal,
) -> None:
    """Under a qualification period, whatever the member earned on which days and
    whether a requalification lowered its rank since: a recording of ``pending`` rank
    points on ``day`` lifts the rank exactly when ``pending >= rank_need(day)`` (issue
    25: the need judged lifetime points against the next threshold above them)."""
    member = Member(user_id="m")
    member.fraction_rank_points = fraction
    for i, (offset, points) in enumerate(sorted(credits)):
        on = (START + timedelta(days=offset)).isoformat()
        member.record_pending(f"w1.{i + 1}.0", Decimal(0), Decimal(points), 1, 1, QUALIFIED, on=on)
    if requalify_on is not None:
        as_of = START + timedelta(days=requalify_on)
        member.requalify(QUALIFIED, datetime(as_of.year, as_of.month, as_of.day, tzinfo=UTC))
    when = START + timedelta(days=day)
    need = member.rank_need(QUALIFIED, when)
    before = QUALIFIED.order(member.rank)
    member.record_pending("w2.1.0", Decimal(0), pending, 1, 1, QUALIFIED, on=when.isoformat())
    lifted = QUALIFIED.order(member.rank) > before
    assert lifted == (need is not None and pending >= need), (need, member.rank)
