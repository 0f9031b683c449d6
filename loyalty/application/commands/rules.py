"""The rules document: one pydantic model that validates it (for ``PUT /v1/rules``, the
console's editor and dry run, ``loyalty rules load|dry-run|apply`` and the stored
versions), names every problem with its location (``rules[2].currency``), publishes the
OpenAPI schema, and builds the domain's :class:`~loyalty.domain.rules.RuleSet`.

Numbers are exact: a weight is an integer, a float (read through its shortest repr, so
``0.1`` is ``Decimal("0.1")``) or a decimal string, never coerced through binary floats;
an integral number written with a fraction (``5.0``) is an integer, as in JSON Schema,
while a string or a bool is not. Multiplier conditions keep their JSON type, so matching
stays type-aware (``True`` never equals ``1``: ``loyalty.domain.rules.values_equal``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from decimal import Decimal
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    WrapValidator,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from loyalty.application.commands.rules_fields import (
    AfterMonths,
    AttributeValue,
    DailyCap,
    EventTypeField,
    Factor,
    GraceDays,
    RollingDays,
    RuleWeight,
    Threshold,
    at_most_multipliers,
    boolean,
    claimed_version,
    conditions,
    integer_parser,
    is_list,
    list_of_strings,
    month_end,
    object_or_null,
    or_null,
    privilege,
    rank_name,
    refuse,
    start_month,
)
from loyalty.domain.errors import InvalidRules, Problem
from loyalty.domain.expiry import CurrencyExpiry
from loyalty.domain.qualification import RankQualification
from loyalty.domain.ranks import Rank, RankLadder, is_int, ladder_order_problems
from loyalty.domain.rules import (
    MAX_MULTIPLIERS,
    MAX_RANK_POINTS_THRESHOLD,
    Multiplier,
    Rule,
    RuleSet,
    decimal_to_wire,
    event_weight_problem,
)

# ------------------------------------------------------------------------- models


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MultiplierBody(_Strict):
    when: Annotated[
        dict[str, AttributeValue],
        BeforeValidator(conditions),
        Field(
            description="attribute values that must all be equal (type-aware)",
            json_schema_extra={"minProperties": 1},
        ),
    ]
    factor: Factor

    def to_domain(self) -> Multiplier:
        return Multiplier(when=self.when, factor=self.factor)


class RuleBody(_Strict):
    event_type: EventTypeField
    currency: RuleWeight
    rank_points: RuleWeight
    multipliers: Annotated[
        list[MultiplierBody],
        BeforeValidator(at_most_multipliers),
        Field(max_length=MAX_MULTIPLIERS),
    ] = []
    daily_cap: DailyCap = None

    @field_validator("multipliers")
    @classmethod
    def _bounded_event(cls, multipliers: list[MultiplierBody], info: ValidationInfo) -> Any:
        """No event may be worth more than ``MAX_EVENT_WEIGHT`` even when all its
        multipliers match (checked when both weights are valid)."""
        currency, points = info.data.get("currency"), info.data.get("rank_points")
        if isinstance(currency, Decimal) and isinstance(points, Decimal):
            problem = event_weight_problem(currency, points, (m.factor for m in multipliers))
            if problem is not None:
                raise refuse(problem)
        return multipliers

    def to_domain(self) -> Rule:
        return Rule(
            event_type=self.event_type,
            currency=self.currency,
            rank_points=self.rank_points,
            multipliers=tuple(m.to_domain() for m in self.multipliers),
            daily_cap=self.daily_cap,
        )


class RankBody(_Strict):
    name: Annotated[
        str,
        PlainValidator(rank_name),
        WithJsonSchema({"type": "string", "minLength": 1, "maxLength": 64}),
    ]
    min_rank_points: Threshold
    privileges: Annotated[
        list[
            Annotated[
                str,
                PlainValidator(privilege),
                WithJsonSchema({"type": "string", "minLength": 1}),
            ]
        ],
        BeforeValidator(list_of_strings),
    ] = []

    def to_domain(self) -> Rank:
        return Rank(self.name, self.min_rank_points, tuple(self.privileges))


class CurrencyExpiryBody(_Strict):
    """Currency earned in a month expires at the end of the month ``after_months``
    later; lots earned before ``effective_from`` (stamped with the current month when
    left out) never expire unless ``retroactive``."""

    after_months: AfterMonths
    at: Annotated[
        Literal["month_end"],
        PlainValidator(month_end),
        WithJsonSchema({"const": "month_end", "type": "string"}),
    ] = "month_end"
    effective_from: Annotated[
        str | None,
        PlainValidator(start_month),
        WithJsonSchema(or_null({"type": "string", "pattern": r"^[0-9]{4}-(0[1-9]|1[0-2])$"})),
    ] = None
    retroactive: Annotated[bool, PlainValidator(boolean), WithJsonSchema({"type": "boolean"})] = (
        False
    )

    def to_domain(self) -> CurrencyExpiry:
        return CurrencyExpiry(
            after_months=self.after_months,
            effective_from=self.effective_from,
            retroactive=self.retroactive,
        )


class RollingPeriod(_Strict):
    rolling_days: RollingDays


def _period(value: object, handler: Callable[[object], Any]) -> Any:
    """``"calendar_year"`` or ``{"rolling_days": N}``, its problems located inside it."""
    if isinstance(value, str) and value == "calendar_year":
        return value
    if isinstance(value, Mapping):
        return RollingPeriod.model_validate(value)
    if isinstance(value, RollingPeriod):
        return value
    raise refuse("must be 'calendar_year' or {'rolling_days': N}")


class RankQualificationBody(_Strict):
    """A rank is held by rank points earned in the period (or kept through the grace
    after it); upgrades at once, downgrades by the scheduled job."""

    period: Annotated[Literal["calendar_year"] | RollingPeriod, WrapValidator(_period)]
    grace_days: GraceDays = Field(0)

    def to_domain(self) -> RankQualification:
        rolling = None if isinstance(self.period, str) else self.period.rolling_days
        return RankQualification(rolling_days=rolling, grace_days=self.grace_days or 0)


class RulesRequest(_Strict):
    """The body of PUT /v1/rules: a new version of the rules and rank ladder."""

    _require_rank: ClassVar[bool] = True

    rules: list[RuleBody]
    ranks: list[RankBody] = Field(
        description="at least one rank", json_schema_extra={"minItems": 1}
    )
    currency_expiry: Annotated[CurrencyExpiryBody | None, BeforeValidator(object_or_null)] = Field(
        None, description="null: currency never expires"
    )
    rank_qualification: Annotated[RankQualificationBody | None, BeforeValidator(object_or_null)] = (
        Field(None, description="null: ranks by lifetime rank points")
    )
    version: Annotated[
        int | None,
        PlainValidator(claimed_version),
        WithJsonSchema(or_null({"type": "integer", "minimum": 0})),
    ] = Field(None, description="ignored (the store numbers versions); rules show prints it")

    @model_validator(mode="wrap")
    @classmethod
    def _every_problem(cls, data: Any, handler: Callable[[Any], Any], info: ValidationInfo) -> Any:
        """Every problem at once: the fields' own, and those across entries (a repeated
        event type or rank name, thresholds out of order, no rank), which the fields'
        problems elsewhere in the document do not hide."""
        if isinstance(data, BaseModel):
            return handler(data)
        if not isinstance(data, Mapping):
            raise refuse("must be an object with 'rules' and 'ranks'")
        require_rank = (info.context or {}).get("require_rank", cls._require_rank)
        across = _problems_across(data, require_rank=require_rank)
        try:
            body = handler(data)
        except ValidationError as exc:
            raise _joined(cls.__name__, exc.errors(), across) from None
        if across:
            raise _joined(cls.__name__, [], across)
        return body

    def to_domain(self, version: int) -> RuleSet:
        """The :class:`RuleSet` numbered ``version`` (the store numbers versions)."""
        return RuleSet(
            version=version,
            rules={rule.event_type: rule.to_domain() for rule in self.rules},
            ranks=RankLadder(
                tuple(rank.to_domain() for rank in self.ranks),
                None if self.rank_qualification is None else self.rank_qualification.to_domain(),
            ),
            currency_expiry=None
            if self.currency_expiry is None
            else self.currency_expiry.to_domain(),
        )


class RulesBody(RulesRequest):
    """The rules and rank ladder as stored, with their version."""

    model_config = ConfigDict(extra="ignore")
    _require_rank: ClassVar[bool] = False  # versions stored before the check

    version: int
    ranks: list[RankBody]


def _problems_across(data: Mapping[str, Any], *, require_rank: bool) -> list[Problem]:
    problems: list[Problem] = []
    raw_rules = data.get("rules")
    if is_list(raw_rules):
        first: dict[str, int] = {}
        for i, entry in enumerate(raw_rules):
            event_type = entry.get("event_type") if isinstance(entry, Mapping) else None
            if not isinstance(event_type, str):
                continue
            if event_type in first:
                problems.append(
                    (
                        f"rules[{i}].event_type",
                        f"duplicate event type (see rules[{first[event_type]}])",
                    )
                )
            else:
                first[event_type] = i
    raw_ranks = data.get("ranks")
    if is_list(raw_ranks):
        if require_rank and not raw_ranks:
            problems.append(("ranks", "must list at least one rank"))
        names: list[tuple[int, str | None]] = []
        thresholds: list[tuple[int, int | None]] = []
        for i, entry in enumerate(raw_ranks):
            if not isinstance(entry, Mapping):
                continue
            if "name" in entry:
                names.append((i, _or_none(rank_name, entry["name"])))
            if "min_rank_points" in entry:
                parse = integer_parser(MAX_RANK_POINTS_THRESHOLD)
                thresholds.append((i, _or_none(parse, entry["min_rank_points"])))
        problems.extend(ladder_order_problems(names, thresholds))
    return problems


def _or_none(parse: Callable[[object], Any], value: object) -> Any:
    try:
        return parse(value)
    except PydanticCustomError:
        return None


def _joined(title: str, errors: Iterable[Any], problems: list[Problem]) -> ValidationError:
    details: list[InitErrorDetails] = [
        {"type": PydanticCustomError(e["type"], e["msg"]), "loc": e["loc"], "input": e["input"]}
        for e in errors
    ]
    details.extend({"type": refuse(msg), "loc": (loc,), "input": None} for loc, msg in problems)
    return ValidationError.from_exception_data(title, details)


# ------------------------------------------------------------------------- errors

_MESSAGES = {
    "missing": "field required",
    "extra_forbidden": "unknown field",
    "model_type": "must be an object",
    "model_attributes_type": "must be an object",
    "dict_type": "must be an object",
    "list_type": "must be a list",
}


def location(loc: Iterable[int | str]) -> str:
    """A pydantic location as the API writes it: ``rules[0].multipliers[1].factor``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else part
    return out


def problems_of(exc: ValidationError) -> list[Problem]:
    """The located problems of a rules document (``InvalidRules.problems``)."""
    return [(location(e["loc"]), _MESSAGES.get(e["type"], e["msg"])) for e in exc.errors()]


def parse_rules(data: object, *, require_rank: bool = True) -> RulesRequest:
    """``data`` (a decoded rules document) validated, or :class:`InvalidRules` listing
    every problem with its location. ``require_rank``: a new version needs a rank;
    versions stored before that check are read with ``require_rank=False`` (under an
    empty ladder every member has rank null and no privileges)."""
    try:
        return RulesRequest.model_validate(data, context={"require_rank": require_rank})
    except ValidationError as exc:
        raise InvalidRules(problems_of(exc)) from None


def parse_rule_set(data: object, version: int, *, require_rank: bool = True) -> RuleSet:
    """The :class:`RuleSet` numbered ``version`` of a rules document, or
    :class:`InvalidRules`. A top-level ``version`` key (as :func:`rule_set_to_wire`
    writes it) is checked (null or an integer >= 0) and ignored: the argument is
    authoritative."""
    body = parse_rules(data, require_rank=require_rank)
    if not is_int(version) or version < 0:
        raise InvalidRules([("version", "must be an integer >= 0")])
    return body.to_domain(version)


def rule_set_to_wire(rule_set: RuleSet) -> dict[str, Any]:
    """The JSON-ready document of ``rule_set``; ``parse_rule_set(rule_set_to_wire(x),
    x.version) == x``. ``currency_expiry`` / ``rank_qualification`` appear only when set."""
    wire: dict[str, Any] = {
        "version": rule_set.version,
        "rules": [
            {
                "event_type": rule.event_type,
                "currency": decimal_to_wire(rule.currency),
                "rank_points": decimal_to_wire(rule.rank_points),
                "multipliers": [
                    {"when": dict(m.when), "factor": decimal_to_wire(m.factor)}
                    for m in rule.multipliers
                ],
                "daily_cap": rule.daily_cap,
            }
            for rule in rule_set.rules.values()
        ],
        "ranks": [
            {
                "name": rank.name,
                "min_rank_points": rank.min_rank_points,
                "privileges": list(rank.privileges),
            }
            for rank in rule_set.ranks.ranks
        ],
    }
    expiry = rule_set.currency_expiry
    if expiry is not None:
        wire["currency_expiry"] = {
            "after_months": expiry.after_months,
            "at": expiry.at,
            "effective_from": expiry.effective_from,
            "retroactive": expiry.retroactive,
        }
    qualification = rule_set.ranks.qualification
    if qualification is not None:
        wire["rank_qualification"] = {
            "period": "calendar_year"
            if qualification.rolling_days is None
            else {"rolling_days": qualification.rolling_days},
            "grace_days": qualification.grace_days,
        }
    return wire
