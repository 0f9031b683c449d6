"""Member.record_pending (issue 16): exact remainders carried, any split gives the floor
of the exact total; events stored before fractions existed load with zero fractions."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from loyalty.domain.member import Member
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
