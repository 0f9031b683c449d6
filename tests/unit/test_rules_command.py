"""The rules document's one model (``loyalty.application.commands.rules``): every problem
located, exact numbers, the round trip through the wire, what it says where the old hand
parser said less, and that the published schema is the model's."""

from __future__ import annotations

import copy
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import pytest

from loyalty.application.commands.rules import RulesRequest, parse_rule_set, rule_set_to_wire
from loyalty.domain.errors import InvalidRules
from loyalty.domain.rules import DEFAULT_RULES_WIRE


def with_period(period: object) -> dict[str, Any]:
    wire = copy.deepcopy(DEFAULT_RULES_WIRE)
    wire["rank_qualification"] = {"period": period}
    return wire


@pytest.mark.parametrize(
    ("period", "problems"),
    [
        ({"rolling_days": 30, "weeks": 2}, {("rank_qualification.period.weeks", "unknown field")}),
        ({}, {("rank_qualification.period.rolling_days", "field required")}),
        (
            {"rolling_days": 0},
            {("rank_qualification.period.rolling_days", "must be >= 1")},
        ),
        (
            "weekly",
            {("rank_qualification.period", "must be 'calendar_year' or {'rolling_days': N}")},
        ),
    ],
)
def test_a_wrong_period_is_located_inside_it(period: object, problems: set[Any]) -> None:
    with pytest.raises(InvalidRules) as info:
        parse_rule_set(with_period(period), 2)
    assert set(info.value.problems) == problems


def test_the_period_forms_build_their_qualification() -> None:
    ladder = parse_rule_set(with_period({"rolling_days": 30}), 2).ranks
    assert ladder.qualification is not None and ladder.qualification.rolling_days == 30
    ladder = parse_rule_set(with_period("calendar_year"), 2).ranks
    assert ladder.qualification is not None and ladder.qualification.rolling_days is None


def test_the_published_schema_is_the_models() -> None:
    """The schema says what the model checks: bounds, patterns, the rank minimum."""
    schema = RulesRequest.model_json_schema()
    rule = schema["$defs"]["RuleBody"]["properties"]
    assert rule["daily_cap"]["anyOf"][0] == {"type": "integer", "minimum": 0, "maximum": 1_000_000}
    assert rule["multipliers"]["maxItems"] == 32
    assert rule["event_type"]["pattern"] == "^[a-z0-9_.-]{1,64}$"
    assert schema["properties"]["ranks"]["minItems"] == 1
    factor = schema["$defs"]["MultiplierBody"]["properties"]["factor"]
    assert {t["type"] for t in factor["anyOf"]} == {"integer", "number", "string"}


# ------------------------------------------------------------------------ parse

VALID: dict[str, Any] = {
    "rules": [
        {
            "event_type": "played_game",
            "currency": 5,
            "rank_points": "10",
            "multipliers": [{"when": {"result": "win"}, "factor": "1.5"}],
            "daily_cap": 3,
        },
        {"event_type": "logged_on", "currency": 1, "rank_points": 1},
    ],
    "ranks": [
        {"name": "bronze", "min_rank_points": 0, "privileges": ["a"]},
        {"name": "silver", "min_rank_points": 100, "privileges": ["a", "b"]},
    ],
}


def edit(change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    wire = copy.deepcopy(VALID)
    change(wire)
    return wire


def set_in(path: tuple[Any, ...], value: Any) -> Callable[[dict[str, Any]], None]:
    def change(wire: dict[str, Any]) -> None:
        target: Any = wire
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return change


def drop(path: tuple[Any, ...]) -> Callable[[dict[str, Any]], None]:
    def change(wire: dict[str, Any]) -> None:
        target: Any = wire
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]

    return change


R0 = ("rules", 0)
M0 = ("rules", 0, "multipliers", 0)


@pytest.mark.parametrize(
    ("change", "location"),
    [
        (set_in((*R0, "currency"), -1), "rules[0].currency"),
        (set_in((*R0, "rank_points"), "-0.5"), "rules[0].rank_points"),
        (set_in((*R0, "currency"), "lots"), "rules[0].currency"),
        (set_in((*R0, "currency"), True), "rules[0].currency"),
        (set_in((*R0, "currency"), "NaN"), "rules[0].currency"),
        (set_in((*R0, "currency"), float("inf")), "rules[0].currency"),
        (set_in((*R0, "currency"), None), "rules[0].currency"),
        (set_in((*R0, "currency"), "0.0000000001"), "rules[0].currency"),
        (set_in((*R0, "currency"), "1e30"), "rules[0].currency"),
        (drop((*R0, "currency")), "rules[0].currency"),
        (drop((*R0, "event_type")), "rules[0].event_type"),
        (set_in((*R0, "bonus"), 1), "rules[0].bonus"),
        (set_in(("rules", 1, "event_type"), "played_game"), "rules[1].event_type"),
        (set_in((*R0, "event_type"), "Played Game"), "rules[0].event_type"),
        (set_in((*R0, "event_type"), "a" * 65), "rules[0].event_type"),
        (set_in((*R0, "event_type"), ""), "rules[0].event_type"),
        (set_in((*R0, "event_type"), "game\n"), "rules[0].event_type"),
        (set_in((*R0, "daily_cap"), -1), "rules[0].daily_cap"),
        (set_in((*R0, "daily_cap"), 1.5), "rules[0].daily_cap"),
        (set_in((*R0, "daily_cap"), "three"), "rules[0].daily_cap"),
        (set_in((*R0, "multipliers"), {"when": {}}), "rules[0].multipliers"),
        (set_in((*M0, "factor"), "-2"), "rules[0].multipliers[0].factor"),
        (set_in((*M0, "factor"), "double"), "rules[0].multipliers[0].factor"),
        (drop((*M0, "factor")), "rules[0].multipliers[0].factor"),
        (set_in((*M0, "when"), {}), "rules[0].multipliers[0].when"),
        (set_in((*M0, "when"), ["result"]), "rules[0].multipliers[0].when"),
        (set_in((*M0, "when"), {"result": ["win"]}), "rules[0].multipliers[0].when.result"),
        (set_in((*M0, "extra"), 1), "rules[0].multipliers[0].extra"),
        (
            set_in((*R0, "multipliers"), [{"when": {"a": 1}, "factor": 1000}] * 3),
            "rules[0].multipliers",
        ),
        (set_in(("rules", 0, "multipliers", 0), "x2"), "rules[0].multipliers[0]"),
        (set_in(("rules", 0), "played_game"), "rules[0]"),
        (set_in(("ranks", 1, "min_rank_points"), 0), "ranks[1].min_rank_points"),
        (set_in(("ranks", 1, "min_rank_points"), -5), "ranks[1].min_rank_points"),
        (set_in(("ranks", 0, "min_rank_points"), 500), "ranks[1].min_rank_points"),
        (set_in(("ranks", 1, "min_rank_points"), "many"), "ranks[1].min_rank_points"),
        (set_in(("ranks", 1, "min_rank_points"), "100"), "ranks[1].min_rank_points"),
        (set_in((*R0, "daily_cap"), "3"), "rules[0].daily_cap"),
        (set_in(("ranks",), []), "ranks"),
        (set_in(("version",), {}), "version"),
        (set_in(("version",), "1"), "version"),
        (set_in(("ranks", 1, "name"), "bronze"), "ranks[1].name"),
        (set_in(("ranks", 0, "name"), ""), "ranks[0].name"),
        (drop(("ranks", 0, "min_rank_points")), "ranks[0].min_rank_points"),
        (set_in(("ranks", 0, "privileges"), [1]), "ranks[0].privileges[0]"),
        (set_in(("ranks", 0, "privileges"), "a"), "ranks[0].privileges"),
        (set_in(("ranks", 0, "colour"), "brown"), "ranks[0].colour"),
        (drop(("rules",)), "rules"),
        (drop(("ranks",)), "ranks"),
        (set_in(("rules",), {"played_game": {}}), "rules"),
        (set_in(("extra",), 1), "extra"),
    ],
)
def test_invalid_rules_are_rejected_with_location(
    change: Callable[[dict[str, Any]], None], location: str
) -> None:
    with pytest.raises(InvalidRules) as info:
        parse_rule_set(edit(change), version=1)
    assert location in [loc for loc, _ in info.value.problems], info.value.problems


def test_invalid_rules_list_every_problem() -> None:
    wire = copy.deepcopy(VALID)
    wire["rules"][0]["currency"] = -1
    wire["rules"][0]["multipliers"][0]["factor"] = "x"
    wire["rules"][1]["event_type"] = "played_game"
    wire["ranks"][1]["min_rank_points"] = 0
    with pytest.raises(InvalidRules) as info:
        parse_rule_set(wire, version=1)
    assert {loc for loc, _ in info.value.problems} == {
        "rules[0].currency",
        "rules[0].multipliers[0].factor",
        "rules[1].event_type",
        "ranks[1].min_rank_points",
    }


def test_non_object_document_is_rejected() -> None:
    with pytest.raises(InvalidRules) as info:
        parse_rule_set(["rules"], version=1)
    assert [loc for loc, _ in info.value.problems] == [""]


def test_parse_accepts_weights_as_int_string_or_float_and_integers_as_numbers() -> None:
    wire = edit(set_in((*R0, "currency"), 0.1))
    wire["rules"][1]["rank_points"] = "2.50"
    wire["ranks"][1]["min_rank_points"] = 100.0  # integral: an integer, as in JSON Schema
    rs = parse_rule_set(wire, version=3)
    assert rs.version == 3
    assert rs.rules["played_game"].currency == Decimal("0.1")  # not binary 0.1000000000000000055
    assert rs.rules["logged_on"].rank_points == Decimal("2.5")
    assert rs.ranks.rank_for(100) is not None and rs.ranks.rank_for(100).name == "silver"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "wire",
    [
        pytest.param(DEFAULT_RULES_WIRE, id="default"),
        pytest.param(VALID, id="valid"),
        pytest.param(
            {"rules": [], "ranks": [{"name": "member", "min_rank_points": 0}]}, id="empty"
        ),
        pytest.param(
            {
                "rules": [
                    {
                        "event_type": "x.y-z_1",
                        "currency": 0.1,
                        "rank_points": "0.333333333",
                        "multipliers": [
                            {"when": {"a": True, "b": None, "c": 1.5, "d": "s"}, "factor": "0"},
                            {"when": {"e": 2}, "factor": 1000},
                        ],
                        "daily_cap": 0,
                    }
                ],
                "ranks": [{"name": "only", "min_rank_points": 7}],
            },
            id="edge values",
        ),
    ],
)
def test_round_trip_through_wire(wire: dict[str, Any]) -> None:
    rule_set = parse_rule_set(wire, version=4)
    out = rule_set_to_wire(rule_set)
    assert parse_rule_set(out, version=4) == rule_set
    assert out["version"] == 4


def test_wire_writes_decimals_as_strings_and_integers_as_ints() -> None:
    out = rule_set_to_wire(parse_rule_set(DEFAULT_RULES_WIRE, version=1))
    purchase = next(r for r in out["rules"] if r["event_type"] == "made_purchase")
    assert purchase["multipliers"][0]["factor"] == "1.5"
    assert purchase["currency"] == 10
