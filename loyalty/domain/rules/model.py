"""The rules' value objects: a rule per event type, its multipliers, the rule set.

Pure and immutable; each refuses, on creation, what no entrypoint may store (the bounds
below keep every sum exact and every total far inside a 64-bit column). Reading them from
a document is the edge's job (``loyalty.application.commands.rules``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import date
from decimal import Decimal
from types import MappingProxyType
from typing import Any, Final

from loyalty.domain.errors import InvalidRules, Problem
from loyalty.domain.expiry import CurrencyExpiry
from loyalty.domain.ranks import RankLadder, is_int
from loyalty.domain.rules.exact import EXACT, ONE

AttrValue = str | int | float | bool | None
"""A value a multiplier can require an activity attribute to equal."""

CapKey = tuple[str, str, date]
"""(user_id, event_type, UTC day of occurred_at)."""

EVENT_TYPE_PATTERN: Final = re.compile(r"[a-z0-9_.-]{1,64}")

# Bounds that keep every sum exact, and totals far inside a 64-bit column: no event
# can be worth more than MAX_EVENT_WEIGHT even when all its multipliers match.
MAX_WEIGHT: Final = Decimal(1_000_000)
MAX_EVENT_WEIGHT: Final = Decimal(1_000_000_000)
MAX_FACTOR: Final = Decimal(1_000)
MAX_DECIMAL_PLACES: Final = 9
MAX_MULTIPLIERS: Final = 32
MAX_DAILY_CAP: Final = 1_000_000
MAX_RANK_POINTS_THRESHOLD: Final = 10**15

# A context wide enough that products of bounded weights and factors, and their
PLACES_QUANTUM: Final = Decimal(1).scaleb(-MAX_DECIMAL_PLACES)


def values_equal(expected: object, actual: object) -> bool:
    """Type-aware equality for multiplier conditions.

    Numbers (int, float) compare numerically (1 == 1.0); a bool only equals a bool
    (True != 1); a string only equals a string ("1" != 1); None only equals None.
    """
    if isinstance(expected, bool) or isinstance(actual, bool):
        return isinstance(expected, bool) and isinstance(actual, bool) and expected == actual
    if expected is None or actual is None:
        return expected is None and actual is None
    if isinstance(expected, int | float):
        return isinstance(actual, int | float) and expected == actual
    if isinstance(expected, str):
        return isinstance(actual, str) and expected == actual
    return False


def _is_attr_value(value: object) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    return value is None or isinstance(value, str | int | bool)


def decimal_problem(number: Decimal, maximum: Decimal) -> str | None:
    """What is wrong with a finite ``number`` as a weight, factor or count bounded by
    ``maximum`` (negative, too large, too many decimal places), or None."""
    if number < 0:
        return "must be >= 0"
    if number > maximum:
        return f"must be <= {maximum}"
    if EXACT.quantize(number, PLACES_QUANTUM) != number:
        return f"must have at most {MAX_DECIMAL_PLACES} decimal places"
    return None


def event_weight_problem(
    currency: Decimal, rank_points: Decimal, factors: Iterable[Decimal]
) -> str | None:
    """Why an event of a rule with these weights could be worth more than
    ``MAX_EVENT_WEIGHT`` when all multipliers match, or None."""
    all_factors = ONE
    for factor in factors:
        all_factors = EXACT.multiply(all_factors, factor)
    if EXACT.multiply(max(currency, rank_points), all_factors) > MAX_EVENT_WEIGHT:
        return f"an event could be worth more than {MAX_EVENT_WEIGHT} when all multipliers match"
    return None


def _as_decimal(value: object) -> Decimal | None:
    """An int or finite Decimal as a Decimal; None for anything else."""
    if is_int(value):
        assert isinstance(value, int)
        return Decimal(value)
    if isinstance(value, Decimal) and value.is_finite():
        return value
    return None


@dataclass(frozen=True)
class Multiplier:
    """Multiply an event's weights by ``factor`` when all ``when`` conditions hold."""

    when: Mapping[str, AttrValue]
    factor: Decimal

    def __post_init__(self) -> None:
        object.__setattr__(self, "when", MappingProxyType(dict(self.when)))
        factor = _as_decimal(self.factor)
        problems: list[Problem] = []
        if not self.when:
            problems.append(("when", "must have at least one condition"))
        for key, value in self.when.items():
            if not isinstance(key, str) or not key:
                problems.append(("when", "keys must be non-empty strings"))
            elif not _is_attr_value(value):
                problems.append((f"when.{key}", "must be a string, number, bool or null"))
        if factor is None:
            problems.append(("factor", "must be a finite decimal"))
        elif (problem := decimal_problem(factor, MAX_FACTOR)) is not None:
            problems.append(("factor", problem))
        if problems:
            raise InvalidRules(problems)
        object.__setattr__(self, "factor", factor)

    def matches(self, attributes: Mapping[str, Any]) -> bool:
        """True when every condition's key is present and (type-aware) equal."""
        for key, expected in self.when.items():
            if key not in attributes or not values_equal(expected, attributes[key]):
                return False
        return True


@dataclass(frozen=True)
class Rule:
    """How one event type is weighted."""

    event_type: str
    currency: Decimal
    rank_points: Decimal
    multipliers: tuple[Multiplier, ...] = ()
    daily_cap: int | None = None
    """At most this many events of the type per member per UTC day earn anything."""

    def __post_init__(self) -> None:
        problems: list[Problem] = []
        if not isinstance(self.event_type, str) or not EVENT_TYPE_PATTERN.fullmatch(
            self.event_type
        ):
            problems.append(("event_type", "must match [a-z0-9_.-]{1,64}"))
        for name in ("currency", "rank_points"):
            value = _as_decimal(getattr(self, name))
            if value is None:
                problems.append((name, "must be a finite decimal"))
            elif (problem := decimal_problem(value, MAX_WEIGHT)) is not None:
                problems.append((name, problem))
            else:
                object.__setattr__(self, name, value)
        object.__setattr__(self, "multipliers", tuple(self.multipliers))
        if len(self.multipliers) > MAX_MULTIPLIERS:
            problems.append(("multipliers", f"at most {MAX_MULTIPLIERS} allowed"))
        for i, multiplier in enumerate(self.multipliers):
            if not isinstance(multiplier, Multiplier):
                problems.append((f"multipliers[{i}]", "must be a Multiplier"))
        cap = self.daily_cap
        if cap is not None and (not is_int(cap) or not 0 <= cap <= MAX_DAILY_CAP):
            problems.append(("daily_cap", f"must be null or an integer in 0..{MAX_DAILY_CAP}"))
        if not problems:
            problem = event_weight_problem(
                self.currency, self.rank_points, (m.factor for m in self.multipliers)
            )
            if problem is not None:
                problems.append(("multipliers", problem))
        if problems:
            raise InvalidRules(problems)


@dataclass(frozen=True)
class RuleSet:
    """A versioned set of rules (one per event type) and the rank ladder."""

    version: int
    rules: Mapping[str, Rule]
    ranks: RankLadder
    currency_expiry: CurrencyExpiry | None = None
    """None: currency never expires (the default)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "rules", MappingProxyType(dict(self.rules)))
        problems: list[Problem] = []
        if not is_int(self.version) or self.version < 0:
            problems.append(("version", "must be an integer >= 0"))
        for key, rule in self.rules.items():
            if not isinstance(rule, Rule) or rule.event_type != key:
                problems.append((f"rules.{key}", "must be a Rule for that event type"))
        if not isinstance(self.ranks, RankLadder):
            problems.append(("ranks", "must be a RankLadder"))
        else:
            for i, rank in enumerate(self.ranks.ranks):
                if rank.min_rank_points > MAX_RANK_POINTS_THRESHOLD:
                    problems.append(
                        (f"ranks[{i}].min_rank_points", f"must be <= {MAX_RANK_POINTS_THRESHOLD}")
                    )
        if problems:
            raise InvalidRules(problems)

    def rule_for(self, event_type: str) -> Rule | None:
        return self.rules.get(event_type)
