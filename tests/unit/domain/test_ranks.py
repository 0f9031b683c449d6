import pytest

from loyalty.domain.errors import InvalidRules
from loyalty.domain.ranks import Rank, RankLadder

LADDER = RankLadder(
    (
        Rank("bronze", 100, ("member_prices",)),
        Rank("silver", 1000, ("member_prices", "free_shipping")),
        Rank("gold", 5000, ("member_prices", "free_shipping", "priority_support")),
    )
)


@pytest.mark.parametrize(
    ("points", "expected"),
    [
        (0, None),
        (99, None),
        (100, "bronze"),
        (101, "bronze"),
        (999, "bronze"),
        (1000, "silver"),
        (4999, "silver"),
        (5000, "gold"),
        (10**12, "gold"),
    ],
)
def test_rank_for_is_highest_rank_whose_threshold_is_reached(
    points: int, expected: str | None
) -> None:
    rank = LADDER.rank_for(points)
    assert (rank.name if rank else None) == expected


def test_rank_carries_its_privileges() -> None:
    rank = LADDER.rank_for(5000)
    assert rank is not None
    assert rank.privileges == ("member_prices", "free_shipping", "priority_support")


def test_empty_ladder_has_no_rank() -> None:
    assert RankLadder(()).rank_for(10**6) is None


@pytest.mark.parametrize(
    ("ranks", "location"),
    [
        ((Rank("a", 0), Rank("b", 0)), "ranks[1].min_rank_points"),
        ((Rank("a", 10), Rank("b", 5)), "ranks[1].min_rank_points"),
        ((Rank("a", 0), Rank("b", 10), Rank("c", 7)), "ranks[2].min_rank_points"),
        ((Rank("a", -1),), "ranks[0].min_rank_points"),
        ((Rank("a", 1.5),), "ranks[0].min_rank_points"),  # type: ignore[arg-type]
        ((Rank("a", True),), "ranks[0].min_rank_points"),
        ((Rank("", 0),), "ranks[0].name"),
        ((Rank("  ", 0),), "ranks[0].name"),
        ((Rank("a", 0), Rank("a", 10)), "ranks[1].name"),
        ((Rank("a", 0, ("",)),), "ranks[0].privileges[0]"),
    ],
)
def test_invalid_ladder_is_rejected_with_location(ranks: tuple[Rank, ...], location: str) -> None:
    with pytest.raises(InvalidRules) as info:
        RankLadder(ranks)
    assert location in [loc for loc, _ in info.value.problems]
    assert info.value.code == "invalid_rules"


def test_ladder_reports_every_problem() -> None:
    with pytest.raises(InvalidRules) as info:
        RankLadder((Rank("", 0), Rank("b", -5), Rank("c", 10), Rank("c", 3)))
    locations = {loc for loc, _ in info.value.problems}
    assert {
        "ranks[0].name",
        "ranks[1].min_rank_points",
        "ranks[3].name",
        "ranks[3].min_rank_points",
    } <= locations
