"""The rules document's field types: exact numbers (a weight is an int, a float read
through its shortest repr, or a decimal string; an integral ``5.0`` is an integer, a
string or a bool is not), the checks of each field with the message it gives, and the
JSON Schema each publishes. The models are in ``loyalty.application.commands.rules``."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any, Literal, TypeGuard

from pydantic import (
    BaseModel,
    Field,
    PlainSerializer,
    PlainValidator,
    WithJsonSchema,
)
from pydantic_core import PydanticCustomError

from loyalty.domain.expiry import LEGACY, MAX_AFTER_MONTHS, is_month
from loyalty.domain.qualification import MAX_GRACE_DAYS, MAX_ROLLING_DAYS
from loyalty.domain.ranks import is_int
from loyalty.domain.rules import (
    EVENT_TYPE_PATTERN,
    MAX_DAILY_CAP,
    MAX_FACTOR,
    MAX_MULTIPLIERS,
    MAX_RANK_POINTS_THRESHOLD,
    MAX_WEIGHT,
    decimal_problem,
    decimal_to_wire,
)

_ERROR = "invalid_rules"


def refuse(message: str) -> PydanticCustomError:
    return PydanticCustomError(_ERROR, message)


def is_list(value: object) -> TypeGuard[Sequence[Any]]:
    return isinstance(value, Sequence) and not isinstance(value, str | bytes)


# ------------------------------------------------------------------------ numbers


def to_decimal(value: object) -> Decimal | None:
    """A finite decimal from an int, a float (via its repr), a decimal string (at most
    64 characters) or a Decimal; None for anything else."""
    number: Decimal | None = None
    if is_int(value):
        assert isinstance(value, int)
        number = Decimal(value)
    elif isinstance(value, float):
        # via str, so 0.1 means Decimal("0.1"), not the binary approximation
        number = Decimal(str(value)) if math.isfinite(value) else None
    elif isinstance(value, str) and len(value) <= 64:
        try:
            number = Decimal(value)
        except InvalidOperation:
            number = None
    elif isinstance(value, Decimal):
        number = value
    return number if number is not None and number.is_finite() else None


def decimal_parser(maximum: Decimal) -> Callable[[object], Decimal]:
    def parse(value: object) -> Decimal:
        number = to_decimal(value)
        if number is None:
            raise refuse("must be a number (integer, decimal string or float)")
        problem = decimal_problem(number, maximum)
        if problem is not None:
            raise refuse(problem)
        return number

    return parse


def integer_parser(maximum: int, minimum: int = 0) -> Callable[[object], int]:
    """A bounded JSON integer: an int, or a float/Decimal with no fraction (``5.0``);
    never a string or a bool."""

    def parse(value: object) -> int:
        if not (is_int(value) or isinstance(value, float | Decimal)):
            raise refuse("must be an integer")
        number = decimal_parser(Decimal(maximum))(value)
        if number != number.to_integral_value():
            raise refuse("must be an integer")
        if number < minimum:
            raise refuse(f"must be >= {minimum}")
        return int(number)

    return parse


def optional_parser(parse: Callable[[object], Any]) -> Callable[[object], Any]:
    return lambda value: None if value is None else parse(value)


def integer_schema(minimum: int, maximum: int) -> dict[str, Any]:
    return {"type": "integer", "minimum": minimum, "maximum": maximum}


def or_null(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}


NUMBER_SCHEMA = WithJsonSchema(
    {"anyOf": [{"type": "integer"}, {"type": "number"}, {"type": "string"}]}
)
WEIGHT_TEXT = 'non-negative decimal: a number or a decimal string ("2.5")'

RuleWeight = Annotated[
    Decimal,
    PlainValidator(decimal_parser(MAX_WEIGHT)),
    PlainSerializer(decimal_to_wire),
    NUMBER_SCHEMA,
    Field(description=WEIGHT_TEXT),
]
"""A rule's currency or rank points: a non-negative decimal of at most 9 places."""
Factor = Annotated[
    Decimal,
    PlainValidator(decimal_parser(MAX_FACTOR)),
    PlainSerializer(decimal_to_wire),
    NUMBER_SCHEMA,
    Field(description=WEIGHT_TEXT),
]
"""A multiplier's factor: a non-negative decimal of at most 9 places."""
Threshold = Annotated[
    int,
    PlainValidator(integer_parser(MAX_RANK_POINTS_THRESHOLD)),
    WithJsonSchema(integer_schema(0, MAX_RANK_POINTS_THRESHOLD)),
]
AfterMonths = Annotated[
    int,
    PlainValidator(integer_parser(MAX_AFTER_MONTHS)),
    WithJsonSchema(integer_schema(0, MAX_AFTER_MONTHS)),
]
RollingDays = Annotated[
    int,
    PlainValidator(integer_parser(MAX_ROLLING_DAYS, minimum=1)),
    WithJsonSchema(integer_schema(1, MAX_ROLLING_DAYS)),
]
DailyCap = Annotated[
    int | None,
    PlainValidator(optional_parser(integer_parser(MAX_DAILY_CAP))),
    WithJsonSchema(or_null(integer_schema(0, MAX_DAILY_CAP))),
]
GraceDays = Annotated[
    int | None,
    PlainValidator(optional_parser(integer_parser(MAX_GRACE_DAYS))),
    WithJsonSchema(or_null(integer_schema(0, MAX_GRACE_DAYS))),
]


# ------------------------------------------------------------------------- fields


def event_type(value: object) -> str:
    if not isinstance(value, str) or not EVENT_TYPE_PATTERN.fullmatch(value):
        raise refuse("must match [a-z0-9_.-]{1,64}")
    return value


EventTypeField = Annotated[
    str,
    PlainValidator(event_type),
    WithJsonSchema({"type": "string", "pattern": r"^[a-z0-9_.-]{1,64}$"}),
]


def attribute(value: object) -> str | int | float | bool | None:
    if isinstance(value, float) and not math.isfinite(value):
        raise refuse("must be a string, number, bool or null")
    if value is None or isinstance(value, str | int | float | bool):
        return value  # its JSON type kept: matching is type-aware
    raise refuse("must be a string, number, bool or null")


AttributeValue = Annotated[
    str | int | float | bool | None,
    PlainValidator(attribute),
    WithJsonSchema(
        {"anyOf": [{"type": t} for t in ("string", "integer", "number", "boolean", "null")]}
    ),
]


def conditions(value: object) -> object:
    if not isinstance(value, Mapping):
        raise refuse("must be an object")
    if not value:
        raise refuse("must have at least one condition")
    if not all(isinstance(key, str) and key for key in value):
        raise refuse("keys must be non-empty strings")
    return dict(value)


def list_of_strings(value: object) -> object:
    if not is_list(value):
        raise refuse("must be a list of strings")
    return value


def at_most_multipliers(value: object) -> object:
    if is_list(value) and len(value) > MAX_MULTIPLIERS:
        raise refuse(f"at most {MAX_MULTIPLIERS} allowed")
    return value


def object_or_null(value: object) -> object:
    if value is not None and not isinstance(value, Mapping | BaseModel):
        raise refuse("must be an object or null")
    return value


def rank_name(value: object) -> str:
    if not isinstance(value, str) or not value.strip() or len(value) > 64:
        raise refuse("must be a non-empty string (<= 64)")
    return value


def privilege(value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise refuse("must be a non-empty string")
    return value


def month_end(value: object) -> Literal["month_end"]:
    if value != "month_end":
        raise refuse("must be 'month_end'")
    return "month_end"


def start_month(value: object) -> str | None:
    if value is not None and (not is_month(value) or value == LEGACY):
        raise refuse("must be a month 'YYYY-MM' or null")
    assert value is None or isinstance(value, str)
    return value


def boolean(value: object) -> bool:
    if not isinstance(value, bool):
        raise refuse("must be a boolean")
    return value


def claimed_version(value: object) -> int | None:
    if value is not None and (not is_int(value) or value < 0):  # type: ignore[operator]
        raise refuse("must be null or an integer >= 0 (the store numbers versions)")
    assert value is None or isinstance(value, int)
    return value
