from collections.abc import Callable
from datetime import date, datetime
from decimal import Decimal
from typing import Any

import pytest

from loyalty.application.commands.rules import parse_rule_set
from loyalty.domain.errors import InvalidRules
from loyalty.domain.ranks import RankLadder
from loyalty.domain.rules import (
    DEFAULT_RULES_WIRE,
    Activity,
    CapCounter,
    Multiplier,
    Rule,
    RuleSet,
    aggregate,
    weigh,
)

NOON = "2026-01-01T12:00:00+00:00"


def act(event_type: str = "game", user: str = "u1", at: str = NOON, **attributes: Any) -> Activity:
    return Activity(user, event_type, datetime.fromisoformat(at), attributes)


def rule(
    currency: str | int = 5,
    rank_points: str | int = 10,
    *multipliers: tuple[dict[str, Any], str | int],
    cap: int | None = None,
    event_type: str = "game",
) -> Rule:
    return Rule(
        event_type,
        Decimal(currency),
        Decimal(rank_points),
        tuple(Multiplier(when, Decimal(factor)) for when, factor in multipliers),
        cap,
    )


def rules(*items: Rule) -> RuleSet:
    return RuleSet(version=7, rules={r.event_type: r for r in items}, ranks=RankLadder(()))


# ------------------------------------------------------------------------- weigh

WIN = ({"result": "win"}, 2)


@pytest.mark.parametrize(
    ("the_rule", "activity", "expected"),
    [
        pytest.param(rule(5, 10), act(), ("5", "10"), id="base weights"),
        pytest.param(rule(5, 10, WIN), act(result="win"), ("10", "20"), id="one match"),
        pytest.param(rule(5, 10, WIN), act(result="loss"), ("5", "10"), id="value differs"),
        pytest.param(rule(5, 10, WIN), act(), ("5", "10"), id="attribute missing"),
        pytest.param(
            rule(5, 10, WIN, ({"tier": "gold"}, "1.5")),
            act(result="win", tier="gold"),
            ("15", "30"),
            id="all matching factors multiply",
        ),
        pytest.param(
            rule(5, 10, WIN, ({"tier": "gold"}, "1.5")),
            act(result="win", tier="silver"),
            ("10", "20"),
            id="only matching factors apply",
        ),
        pytest.param(
            rule(5, 10, ({"result": "win", "tier": "gold"}, 3)),
            act(result="win", tier="silver"),
            ("5", "10"),
            id="every condition of a multiplier must hold",
        ),
        pytest.param(rule(5, 10, ({"f": True}, 2)), act(f=True), ("10", "20"), id="True==True"),
        pytest.param(rule(5, 10, ({"f": True}, 2)), act(f=1), ("5", "10"), id="1 is not True"),
        pytest.param(rule(5, 10, ({"n": 1}, 2)), act(n=True), ("5", "10"), id="True is not 1"),
        pytest.param(rule(5, 10, ({"n": 1}, 2)), act(n=1.0), ("10", "20"), id="1.0 equals 1"),
        pytest.param(rule(5, 10, ({"n": 1}, 2)), act(n="1"), ("5", "10"), id="'1' is not 1"),
        pytest.param(rule(5, 10, ({"s": "1"}, 2)), act(s=1), ("5", "10"), id="1 is not '1'"),
        pytest.param(rule(5, 10, ({"v": None}, 2)), act(v=None), ("10", "20"), id="null==null"),
        pytest.param(rule(5, 10, ({"v": None}, 2)), act(), ("5", "10"), id="missing != null"),
        pytest.param(rule(5, 10, ({"v": 0}, 2)), act(v=None), ("5", "10"), id="null is not 0"),
        pytest.param(rule(5, 10, WIN, ({"x": 1}, 0)), act(x=1), ("0", "0"), id="factor zero"),
        pytest.param(rule("0.5", "0.25"), act(), ("0.5", "0.25"), id="exact decimals"),
    ],
)
def test_weigh(the_rule: Rule, activity: Activity, expected: tuple[str, str]) -> None:
    assert weigh(activity, the_rule) == (Decimal(expected[0]), Decimal(expected[1]))


# --------------------------------------------------------------------- aggregate


@pytest.mark.parametrize(
    ("rule_set", "activities", "expected"),
    [
        pytest.param(
            rules(rule(5, 10)),
            [act(), act()],
            {"u1": (10, 20, 0, 0)},
            id="weights add up",
        ),
        pytest.param(
            rules(rule(5, 10, cap=3)),
            [act()] * 3,
            {"u1": (15, 30, 0, 0)},
            id="exactly N events under cap N all earn",
        ),
        pytest.param(
            rules(rule(5, 10, cap=3)),
            [act()] * 5,
            {"u1": (15, 30, 2, 0)},
            id="N+1th and later are capped",
        ),
        pytest.param(
            rules(rule(5, 10, cap=0)),
            [act()],
            {"u1": (0, 0, 1, 0)},
            id="cap 0 earns nothing",
        ),
        pytest.param(
            rules(rule(5, 10, cap=1)),
            [act(at="2026-01-01T23:59:59+00:00"), act(at="2026-01-02T00:00:00+00:00")],
            {"u1": (10, 20, 0, 0)},
            id="cap resets at UTC midnight",
        ),
        pytest.param(
            rules(rule(5, 10, cap=1)),
            [act(at="2026-01-01T23:30:00-02:00"), act(at="2026-01-02T10:00:00+00:00")],
            {"u1": (5, 10, 1, 0)},
            id="offset time counts in its UTC day (next day)",
        ),
        pytest.param(
            rules(rule(5, 10, cap=1)),
            [act(at="2026-01-01T12:00:00+00:00"), act(at="2026-01-01T23:30:00-02:00")],
            {"u1": (10, 20, 0, 0)},
            id="same local day but different UTC days",
        ),
        pytest.param(
            rules(rule(5, 10, cap=1)),
            [act(user="u1"), act(user="u2"), act(user="u1")],
            {"u1": (5, 10, 1, 0), "u2": (5, 10, 0, 0)},
            id="cap is per member",
        ),
        pytest.param(
            rules(rule(5, 10, cap=1), rule(1, 2, cap=1, event_type="login")),
            [act("game"), act("login"), act("game"), act("login")],
            {"u1": (6, 12, 2, 0)},
            id="cap is per event type",
        ),
        pytest.param(
            rules(rule("0.5", "0.5")),
            [act()] * 3,
            {"u1": (1, 1, 0, 0)},
            id="exact sum rounded down once: 3 x 0.5 = 1",
        ),
        pytest.param(
            rules(rule("0.9", "0.3")),
            [act()] * 3,
            {"u1": (2, 0, 0, 0)},
            id="rounding is down, never up: 2.7 -> 2, 0.9 -> 0",
        ),
        pytest.param(
            rules(rule(5, 10)),
            [act("nope"), act("game"), act("nope", user="u2")],
            {"u1": (5, 10, 0, 1), "u2": (0, 0, 0, 1)},
            id="unknown types earn nothing and are counted",
        ),
    ],
)
def test_aggregate(
    rule_set: RuleSet,
    activities: list[Activity],
    expected: dict[str, tuple[int, int, int, int]],
) -> None:
    result = aggregate(activities, rule_set, CapCounter())
    got = {
        user: (d.currency, d.rank_points, d.capped, d.ignored) for user, d in result.drafts.items()
    }
    assert got == expected


def test_aggregate_counts_every_event_and_totals() -> None:
    activities = [act(), act(), act("nope"), act(user="u2"), act("nope", user="u2")]
    result = aggregate(activities, rules(rule(5, 10, cap=1)), CapCounter())
    assert {u: d.event_count for u, d in result.drafts.items()} == {"u1": 3, "u2": 2}
    assert (result.events, result.ignored, result.capped) == (5, 2, 1)
    assert result.rule_version == 7


@pytest.mark.parametrize(
    ("seeded", "earning"),
    [(0, 3), (1, 2), (2, 1), (3, 0), (5, 0)],
)
def test_caps_continue_from_a_seeded_counter(seeded: int, earning: int) -> None:
    key = ("u1", "game", date(2026, 1, 1))
    caps = CapCounter({key: seeded})
    result = aggregate([act()] * 4, rules(rule(5, 10, cap=3)), caps)
    assert result.drafts["u1"].currency == 5 * earning
    assert result.drafts["u1"].capped == 4 - earning
    assert caps.count(key) == max(seeded, 3)


def test_cap_counter_reports_what_changed_for_persistence() -> None:
    day = date(2026, 1, 1)
    untouched = ("u9", "game", day)
    caps = CapCounter({untouched: 1, ("u1", "game", day): 1})
    aggregate([act(), act("login"), act()], rules(rule(cap=5), rule(event_type="login")), caps)
    # Only capped types are tracked; the untouched key is not reported.
    assert caps.changes() == {("u1", "game", day): 3}
    assert caps[untouched] == 1
    caps.mark_saved()
    assert caps.changes() == {}


def test_windows_sharing_a_counter_cap_like_one_aggregation() -> None:
    rule_set = rules(rule(5, 10, cap=2))
    caps = CapCounter()
    first = aggregate([act()], rule_set, caps)
    second = aggregate([act(), act()], rule_set, caps)
    assert (first.drafts["u1"].currency, second.drafts["u1"].currency) == (5, 5)
    assert second.drafts["u1"].capped == 1


def test_activity_requires_timezone_aware_time() -> None:
    with pytest.raises(ValueError):
        Activity("u1", "game", datetime(2026, 1, 1, 12), {})


def test_default_rules_parse_and_weigh_as_documented() -> None:
    rs = parse_rule_set(DEFAULT_RULES_WIRE, version=1)
    assert list(rs.rules) == ["logged_on", "played_game", "joined_competition", "made_purchase"]
    activities = [
        act("logged_on"),
        act("logged_on"),  # daily cap 1
        act("played_game", result="win"),  # 10 / 20
        act("made_purchase", tier="premium"),  # 15 / 7.5
        act("joined_competition"),  # 20 / 50
    ]
    draft = aggregate(activities, rs, CapCounter()).drafts["u1"]
    assert (draft.currency, draft.rank_points, draft.capped) == (
        1 + 10 + 15 + 20,
        1 + 20 + 7 + 50,
        1,
    )
    gold = rs.ranks.rank_for(5000)
    assert gold is not None and gold.name == "gold"
    assert "priority_support" in gold.privileges


@pytest.mark.parametrize(
    ("build", "location"),
    [
        (lambda: rule(1_000_001), "currency"),
        (lambda: rule("0.0000000001"), "currency"),
        (lambda: rule(5, 10, ({"a": 1}, 1001)), "factor"),
        (lambda: rule(5, 10, cap=1_000_001), "daily_cap"),
        (lambda: rule(1001, 10, ({"a": 1}, 1000), ({"b": 1}, 1000)), "multipliers"),
        (lambda: rule(5, 10, *[({"a": 1}, 1)] * 33), "multipliers"),
    ],
)
def test_the_domain_refuses_rules_nobody_may_store(
    build: Callable[[], object], location: str
) -> None:
    """Whoever builds a rule (not only the rules document's model), a weight, factor or
    cap beyond the bounds that keep totals exact and inside a 64-bit column is refused."""
    with pytest.raises(InvalidRules) as info:
        build()
    assert location in [loc for loc, _ in info.value.problems], info.value.problems
