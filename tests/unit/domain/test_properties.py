"""Aggregating consecutive windows with one shared CapCounter is the same as
aggregating everything at once (up to the per-window rounding down)."""

from datetime import UTC, datetime, timedelta
from decimal import Decimal

from hypothesis import given, settings
from hypothesis import strategies as st

from loyalty.domain.ranks import RankLadder
from loyalty.domain.rules import Activity, CapCounter, Multiplier, Rule, RuleSet, aggregate

USERS = ["u1", "u2", "u3"]
TYPES = ["login", "game", "shop", "unknown"]
START = datetime(2026, 1, 1, 20, tzinfo=UTC)

activities_st = st.lists(
    st.builds(
        Activity,
        user_id=st.sampled_from(USERS),
        event_type=st.sampled_from(TYPES),
        # spans several UTC days, so caps reset inside the list
        occurred_at=st.integers(0, 36).map(lambda h: START + timedelta(hours=h)),
        attributes=st.fixed_dictionaries({"result": st.sampled_from(["win", "loss"])}),
    ),
    max_size=40,
)


def rule_st(
    event_type: str, weights: list[Decimal], factors: list[Decimal]
) -> st.SearchStrategy[Rule]:
    return st.builds(
        lambda currency, rank_points, factor, cap: Rule(
            event_type, currency, rank_points, (Multiplier({"result": "win"}, factor),), cap
        ),
        st.sampled_from(weights),
        st.sampled_from(weights),
        st.sampled_from(factors),
        st.none() | st.integers(0, 3),
    )


def rule_set_st(weights: list[Decimal], factors: list[Decimal]) -> st.SearchStrategy[RuleSet]:
    """Rules for all types but the last, which stays unknown."""
    return st.tuples(*(rule_st(t, weights, factors) for t in TYPES[:-1])).map(
        lambda rules: RuleSet(1, {r.event_type: r for r in rules}, RankLadder(()))
    )


def split(items: list[Activity], cuts: list[int]) -> list[list[Activity]]:
    bounds = [0, *sorted(c % (len(items) + 1) for c in cuts), len(items)]
    return [items[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


def totals(windows: list[list[Activity]], rule_set: RuleSet) -> dict[str, tuple[int, ...]]:
    caps = CapCounter()
    summed: dict[str, tuple[int, ...]] = {}
    for window in windows:
        for user, d in aggregate(window, rule_set, caps).drafts.items():
            row = (d.currency, d.rank_points, d.event_count, d.ignored, d.capped)
            old = summed.get(user, (0,) * 5)
            summed[user] = tuple(a + b for a, b in zip(old, row, strict=True))
    return summed


INTEGRAL = [Decimal(n) for n in (0, 1, 2, 5, 10)]
INTEGRAL_FACTORS = [Decimal(n) for n in (0, 1, 2, 3)]


@settings(max_examples=200, deadline=None)
@given(
    activities=activities_st,
    rule_set=rule_set_st(INTEGRAL, INTEGRAL_FACTORS),
    cuts=st.lists(st.integers(0, 40), max_size=5),
)
def test_windows_with_shared_caps_equal_one_aggregation(
    activities: list[Activity], rule_set: RuleSet, cuts: list[int]
) -> None:
    assert totals(split(activities, cuts), rule_set) == totals([activities], rule_set)


FRACTIONAL = [Decimal(s) for s in ("0", "0.25", "0.5", "0.75", "1.5")]
FRACTIONAL_FACTORS = [Decimal(s) for s in ("0.5", "1", "1.5", "2")]


@settings(max_examples=200, deadline=None)
@given(
    activities=activities_st,
    rule_set=rule_set_st(FRACTIONAL, FRACTIONAL_FACTORS),
    cuts=st.lists(st.integers(0, 40), max_size=5),
)
def test_windows_lose_less_than_one_unit_per_extra_window(
    activities: list[Activity], rule_set: RuleSet, cuts: list[int]
) -> None:
    windows = split(activities, cuts)
    parts = totals(windows, rule_set)
    whole = totals([activities], rule_set)
    assert parts.keys() == whole.keys()
    slack = len(windows) - 1
    for user, (currency, rank_points, *counts) in whole.items():
        p_currency, p_rank_points, *p_counts = parts[user]
        assert currency - slack <= p_currency <= currency
        assert rank_points - slack <= p_rank_points <= rank_points
        assert p_counts == counts
