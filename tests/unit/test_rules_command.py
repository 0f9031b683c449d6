"""The rules document's one model (``loyalty.application.commands.rules``): what it says
where the hand parser said less, and that the published schema is the model's."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from loyalty.application.commands.rules import RulesRequest, parse_rule_set
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
