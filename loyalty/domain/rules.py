"""Weighting rules: turn activity events into currency and rank points.

Everything here is pure and deterministic: no I/O, no clock reads. Arithmetic is
exact (decimal); only the per-award total is rounded, and always down.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import (
    ROUND_FLOOR,
    Context,
    Decimal,
    DivisionByZero,
    InvalidOperation,
    Overflow,
)
from types import MappingProxyType
from typing import Any, Final, Protocol

from loyalty.domain.errors import InvalidRules, Problem
from loyalty.domain.expiry import (
    LEGACY,
    MAX_AFTER_MONTHS,
    CurrencyExpiry,
    is_month,
)
from loyalty.domain.qualification import MAX_GRACE_DAYS, MAX_ROLLING_DAYS, RankQualification
from loyalty.domain.ranks import Rank, RankLadder, is_int, ladder_order_problems

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
# sums, are exact; rounding (only ever used explicitly for totals) is floor.
_EXACT: Final = Context(
    prec=2000,
    rounding=ROUND_FLOOR,
    traps=[InvalidOperation, DivisionByZero, Overflow],
)
_ONE: Final = Decimal(1)
_ZERO: Final = Decimal(0)
_PLACES_QUANTUM: Final = Decimal(1).scaleb(-MAX_DECIMAL_PLACES)


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
        elif factor < 0:
            problems.append(("factor", "must be >= 0"))
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
            elif value < 0:
                problems.append((name, "must be >= 0"))
            else:
                object.__setattr__(self, name, value)
        object.__setattr__(self, "multipliers", tuple(self.multipliers))
        for i, multiplier in enumerate(self.multipliers):
            if not isinstance(multiplier, Multiplier):
                problems.append((f"multipliers[{i}]", "must be a Multiplier"))
        cap = self.daily_cap
        if cap is not None and (not is_int(cap) or cap < 0):
            problems.append(("daily_cap", "must be null or an integer >= 0"))
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
        if problems:
            raise InvalidRules(problems)

    def rule_for(self, event_type: str) -> Rule | None:
        return self.rules.get(event_type)


# --------------------------------------------------------------------------- wire

_TOP_FIELDS: Final = frozenset(
    {"rules", "ranks", "version", "currency_expiry", "rank_qualification"}
)
_QUALIFICATION_FIELDS: Final = frozenset({"period", "grace_days"})
_EXPIRY_FIELDS: Final = frozenset({"after_months", "at", "effective_from", "retroactive"})

_RULE_FIELDS: Final = frozenset(
    {"event_type", "currency", "rank_points", "multipliers", "daily_cap"}
)
_MULTIPLIER_FIELDS: Final = frozenset({"when", "factor"})
_RANK_FIELDS: Final = frozenset({"name", "min_rank_points", "privileges"})


def _is_list(value: object) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, str | bytes)


def _check_fields(
    entry: Mapping[Any, Any],
    loc: str,
    allowed: frozenset[str],
    required: Iterable[str],
    problems: list[Problem],
) -> None:
    prefix = f"{loc}." if loc else ""
    for key in entry:
        if key not in allowed:
            problems.append((f"{prefix}{key}", "unknown field"))
    for key in required:
        if key not in entry:
            problems.append((f"{prefix}{key}", "field required"))


def _parse_decimal(
    value: object, loc: str, problems: list[Problem], maximum: Decimal
) -> Decimal | None:
    """A non-negative, bounded, finite decimal from an int, float or string."""
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
    if number is None or not number.is_finite():
        problems.append((loc, "must be a number (integer, decimal string or float)"))
        return None
    if number < 0:
        problems.append((loc, "must be >= 0"))
        return None
    if number > maximum:
        problems.append((loc, f"must be <= {maximum}"))
        return None
    if _EXACT.quantize(number, _PLACES_QUANTUM) != number:
        problems.append((loc, f"must have at most {MAX_DECIMAL_PLACES} decimal places"))
        return None
    return number


def _parse_int(value: object, loc: str, problems: list[Problem], maximum: int) -> int | None:
    """A non-negative bounded JSON integer. As in JSON Schema, an integral number written
    with a fraction (``5.0``) is an integer; a string or a bool is not."""
    if not (is_int(value) or isinstance(value, float | Decimal)):
        problems.append((loc, "must be an integer"))
        return None
    sub: list[Problem] = []
    number = _parse_decimal(value, loc, sub, Decimal(maximum))
    if sub:
        problems.extend(sub)
        return None
    assert number is not None
    if number != number.to_integral_value():
        problems.append((loc, "must be an integer"))
        return None
    return int(number)


def _parse_multiplier(entry: object, loc: str, problems: list[Problem]) -> Multiplier | None:
    if not isinstance(entry, Mapping):
        problems.append((loc, "must be an object"))
        return None
    before = len(problems)
    _check_fields(entry, loc, _MULTIPLIER_FIELDS, _MULTIPLIER_FIELDS, problems)
    when = entry.get("when")
    if "when" in entry:
        if not isinstance(when, Mapping):
            problems.append((f"{loc}.when", "must be an object"))
        elif not when:
            problems.append((f"{loc}.when", "must have at least one condition"))
        else:
            for key, value in when.items():
                if not isinstance(key, str) or not key:
                    problems.append((f"{loc}.when", "keys must be non-empty strings"))
                elif not _is_attr_value(value):
                    problems.append((f"{loc}.when.{key}", "must be a string, number, bool or null"))
    factor = None
    if "factor" in entry:
        factor = _parse_decimal(entry["factor"], f"{loc}.factor", problems, MAX_FACTOR)
    if len(problems) > before:
        return None
    assert isinstance(when, Mapping) and factor is not None
    return Multiplier(when=when, factor=factor)


def _parse_rule(entry: object, loc: str, problems: list[Problem]) -> Rule | None:
    if not isinstance(entry, Mapping):
        problems.append((loc, "must be an object"))
        return None
    before = len(problems)
    _check_fields(entry, loc, _RULE_FIELDS, ("event_type", "currency", "rank_points"), problems)
    event_type = entry.get("event_type")
    if "event_type" in entry and (
        not isinstance(event_type, str) or not EVENT_TYPE_PATTERN.fullmatch(event_type)
    ):
        problems.append((f"{loc}.event_type", "must match [a-z0-9_.-]{1,64}"))
    weights: dict[str, Decimal | None] = {}
    for name in ("currency", "rank_points"):
        if name in entry:
            weights[name] = _parse_decimal(entry[name], f"{loc}.{name}", problems, MAX_WEIGHT)
    multipliers: list[Multiplier] = []
    raw_multipliers = entry.get("multipliers", [])
    if not _is_list(raw_multipliers):
        problems.append((f"{loc}.multipliers", "must be a list"))
    elif len(raw_multipliers) > MAX_MULTIPLIERS:
        problems.append((f"{loc}.multipliers", f"at most {MAX_MULTIPLIERS} allowed"))
    else:
        for j, raw in enumerate(raw_multipliers):
            multiplier = _parse_multiplier(raw, f"{loc}.multipliers[{j}]", problems)
            if multiplier is not None:
                multipliers.append(multiplier)
    daily_cap = None
    if entry.get("daily_cap") is not None:
        daily_cap = _parse_int(entry["daily_cap"], f"{loc}.daily_cap", problems, MAX_DAILY_CAP)
    if len(problems) > before:
        return None
    currency, rank_points = weights["currency"], weights["rank_points"]
    assert isinstance(event_type, str) and currency is not None
    assert rank_points is not None
    all_factors = _ONE
    for multiplier in multipliers:
        all_factors = _EXACT.multiply(all_factors, multiplier.factor)
    if _EXACT.multiply(max(currency, rank_points), all_factors) > MAX_EVENT_WEIGHT:
        problems.append(
            (
                f"{loc}.multipliers",
                f"an event could be worth more than {MAX_EVENT_WEIGHT} when all multipliers match",
            )
        )
        return None
    return Rule(
        event_type=event_type,
        currency=currency,
        rank_points=rank_points,
        multipliers=tuple(multipliers),
        daily_cap=daily_cap,
    )


def _parse_ranks(raw_ranks: object, problems: list[Problem], require_rank: bool) -> list[Rank]:
    if not _is_list(raw_ranks):
        problems.append(("ranks", "must be a list"))
        return []
    assert isinstance(raw_ranks, Sequence)
    if require_rank and not raw_ranks:
        problems.append(("ranks", "must list at least one rank"))
    ranks: list[Rank] = []
    names: list[tuple[int, str | None]] = []
    thresholds: list[tuple[int, int | None]] = []
    for i, entry in enumerate(raw_ranks):
        loc = f"ranks[{i}]"
        if not isinstance(entry, Mapping):
            problems.append((loc, "must be an object"))
            continue
        before = len(problems)
        _check_fields(entry, loc, _RANK_FIELDS, ("name", "min_rank_points"), problems)
        name = entry.get("name")
        if "name" in entry:
            if isinstance(name, str) and name.strip() and len(name) <= 64:
                names.append((i, name))
            else:
                problems.append((f"{loc}.name", "must be a non-empty string (<= 64)"))
        threshold = None
        if "min_rank_points" in entry:
            threshold = _parse_int(
                entry["min_rank_points"],
                f"{loc}.min_rank_points",
                problems,
                MAX_RANK_POINTS_THRESHOLD,
            )
            thresholds.append((i, threshold))
        privileges = entry.get("privileges", [])
        if not _is_list(privileges):
            problems.append((f"{loc}.privileges", "must be a list of strings"))
        else:
            for j, privilege in enumerate(privileges):
                if not isinstance(privilege, str) or not privilege.strip():
                    problems.append((f"{loc}.privileges[{j}]", "must be a non-empty string"))
        if len(problems) == before:
            assert isinstance(name, str) and threshold is not None
            ranks.append(Rank(name, threshold, tuple(privileges)))
    problems.extend(ladder_order_problems(names, thresholds))
    return ranks


def _parse_expiry(raw: object, problems: list[Problem]) -> CurrencyExpiry | None:
    loc = "currency_expiry"
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        problems.append((loc, "must be an object or null"))
        return None
    before = len(problems)
    _check_fields(raw, loc, _EXPIRY_FIELDS, ("after_months",), problems)
    after = None
    if "after_months" in raw:
        after = _parse_int(raw["after_months"], f"{loc}.after_months", problems, MAX_AFTER_MONTHS)
    if raw.get("at", "month_end") != "month_end":
        problems.append((f"{loc}.at", "must be 'month_end'"))
    start = raw.get("effective_from")
    if start is not None and (not is_month(start) or start == LEGACY):
        problems.append((f"{loc}.effective_from", "must be a month 'YYYY-MM' or null"))
    retroactive = raw.get("retroactive", False)
    if not isinstance(retroactive, bool):
        problems.append((f"{loc}.retroactive", "must be a boolean"))
    if len(problems) > before or after is None:
        return None
    return CurrencyExpiry(after_months=after, effective_from=start, retroactive=retroactive)


def _parse_qualification(raw: object, problems: list[Problem]) -> RankQualification | None:
    loc = "rank_qualification"
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        problems.append((loc, "must be an object or null"))
        return None
    before = len(problems)
    _check_fields(raw, loc, _QUALIFICATION_FIELDS, ("period",), problems)
    period = raw.get("period")
    rolling: int | None = None
    if isinstance(period, Mapping) and set(period) == {"rolling_days"}:
        rolling = _parse_int(
            period["rolling_days"], f"{loc}.period.rolling_days", problems, MAX_ROLLING_DAYS
        )
        if rolling is not None and rolling < 1:
            problems.append((f"{loc}.period.rolling_days", "must be >= 1"))
    elif "period" in raw and period != "calendar_year":
        problems.append((f"{loc}.period", "must be 'calendar_year' or {'rolling_days': N}"))
    grace = 0
    if raw.get("grace_days") is not None:
        grace = _parse_int(raw["grace_days"], f"{loc}.grace_days", problems, MAX_GRACE_DAYS) or 0
    if len(problems) > before:
        return None
    return RankQualification(rolling_days=rolling, grace_days=grace)


def parse_rule_set(data: Mapping[str, Any], version: int, *, require_rank: bool = True) -> RuleSet:
    """Build a :class:`RuleSet` from its wire shape, or raise :class:`InvalidRules`
    listing every problem with its location (``rules[2].currency``, ...).

    A top-level ``version`` key (as produced by :func:`rule_set_to_wire`) is
    accepted and ignored: the ``version`` argument is authoritative. It must still be
    null or an integer >= 0, like every other field of the published schema.

    A programme has at least one rank (``require_rank``): a new version with an empty
    ladder is refused. Versions stored before that check are read with
    ``require_rank=False``; under an empty ladder every member has rank null and no
    privileges, as below the lowest threshold of any ladder.
    """
    problems: list[Problem] = []
    if not isinstance(data, Mapping):
        raise InvalidRules([("", "must be an object with 'rules' and 'ranks'")])
    _check_fields(data, "", _TOP_FIELDS, ("rules", "ranks"), problems)
    claimed = data.get("version")
    if claimed is not None and (not is_int(claimed) or claimed < 0):
        problems.append(("version", "must be null or an integer >= 0 (the store numbers versions)"))
    rules: dict[str, Rule] = {}
    raw_rules = data.get("rules", [])
    if not _is_list(raw_rules):
        problems.append(("rules", "must be a list"))
    else:
        first_index: dict[str, int] = {}
        for i, entry in enumerate(raw_rules):
            rule = _parse_rule(entry, f"rules[{i}]", problems)
            event_type = entry.get("event_type") if isinstance(entry, Mapping) else None
            if isinstance(event_type, str):
                if event_type in first_index:
                    problems.append(
                        (
                            f"rules[{i}].event_type",
                            f"duplicate event type (see rules[{first_index[event_type]}])",
                        )
                    )
                    continue
                first_index[event_type] = i
            if rule is not None:
                rules[rule.event_type] = rule
    ranks = _parse_ranks(data.get("ranks", []), problems, require_rank)
    expiry = _parse_expiry(data.get("currency_expiry"), problems)
    qualification = _parse_qualification(data.get("rank_qualification"), problems)
    if not is_int(version) or version < 0:
        problems.append(("version", "must be an integer >= 0"))
    if problems:
        raise InvalidRules(problems)
    return RuleSet(
        version=version,
        rules=rules,
        ranks=RankLadder(tuple(ranks), qualification),
        currency_expiry=expiry,
    )


def decimal_to_wire(value: Decimal) -> int | str:
    """Integral values as ints, others as plain decimal strings ("1.5")."""
    if value == value.to_integral_value(context=_EXACT):
        return int(value)
    return format(value.normalize(_EXACT), "f")


def rule_set_to_wire(rule_set: RuleSet) -> dict[str, Any]:
    """The JSON-ready wire shape; ``parse_rule_set(rule_set_to_wire(x), x.version)
    == x``. ``currency_expiry`` / ``rank_qualification`` appear only when set."""
    wire = {
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


DEFAULT_RULES_WIRE: Final[dict[str, Any]] = {
    "rules": [
        {"event_type": "logged_on", "currency": 1, "rank_points": 1, "daily_cap": 1},
        {
            "event_type": "played_game",
            "currency": 5,
            "rank_points": 10,
            "multipliers": [{"when": {"result": "win"}, "factor": 2}],
            "daily_cap": 50,
        },
        {
            "event_type": "joined_competition",
            "currency": 20,
            "rank_points": 50,
            "daily_cap": 5,
        },
        {
            "event_type": "made_purchase",
            "currency": 10,
            "rank_points": 5,
            "multipliers": [{"when": {"tier": "premium"}, "factor": "1.5"}],
        },
    ],
    "ranks": [
        {"name": "bronze", "min_rank_points": 0, "privileges": ["member_prices"]},
        {
            "name": "silver",
            "min_rank_points": 1000,
            "privileges": ["member_prices", "free_shipping"],
        },
        {
            "name": "gold",
            "min_rank_points": 5000,
            "privileges": ["member_prices", "free_shipping", "priority_support"],
        },
        {
            "name": "platinum",
            "min_rank_points": 20000,
            "privileges": [
                "member_prices",
                "free_shipping",
                "priority_support",
                "vip_events",
            ],
        },
    ],
}
"""The default rule set in wire shape. Treat as read-only (deep-copy to edit)."""


# ---------------------------------------------------------------------- weighing


@dataclass(frozen=True)
class Activity:
    """One activity event from an external service."""

    user_id: str
    event_type: str
    occurred_at: datetime
    attributes: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.occurred_at.tzinfo is None or self.occurred_at.utcoffset() is None:
            raise ValueError("occurred_at must be timezone-aware")

    @property
    def utc_day(self) -> date:
        """The UTC calendar day of ``occurred_at`` (the daily-cap bucket)."""
        return self.occurred_at.astimezone(UTC).date()


def weigh(activity: Activity, rule: Rule) -> tuple[Decimal, Decimal]:
    """Exact (currency, rank_points) of one event: base weights times the factors
    of ALL matching multipliers. Daily caps are not applied here (see aggregate).
    """
    if activity.event_type != rule.event_type:
        raise ValueError("rule does not apply to this activity's event type")
    return weigh_parts(rule, activity.attributes)


class CapCounter(Mapping[CapKey, int]):
    """Per (user_id, event_type, utc_day): how many events counted against a cap.

    Seed it with the persisted counts (``CapCounter(saved)``); after aggregating,
    persist :meth:`changes` (absolute counts to upsert) and call
    :meth:`mark_saved`. Only event types with a ``daily_cap`` are tracked, and a
    count never exceeds its cap. Keys of past days can be deleted from storage once
    no event of that day can still arrive (the caller owns that retention).
    """

    def __init__(self, counts: Mapping[CapKey, int] | None = None) -> None:
        self._counts: dict[CapKey, int] = {}
        self._changed: set[CapKey] = set()
        for key, count in (counts or {}).items():
            if not is_int(count) or count < 0:
                raise ValueError("cap counts must be integers >= 0")
            self._counts[key] = count

    def __getitem__(self, key: CapKey) -> int:
        return self._counts[key]

    def __iter__(self) -> Iterator[CapKey]:
        return iter(self._counts)

    def __len__(self) -> int:
        return len(self._counts)

    def __repr__(self) -> str:
        return f"CapCounter({self._counts!r})"

    def count(self, key: CapKey) -> int:
        """The count for ``key``; 0 when never seen."""
        return self._counts.get(key, 0)

    def take(self, key: CapKey, cap: int) -> bool:
        """Count one more event against ``key`` if it stays within ``cap`` (and remember
        the key changed); True if it did."""
        counts = self._counts
        current = counts.get(key, 0)
        if current >= cap:
            return False
        counts[key] = current + 1
        self._changed.add(key)
        return True

    def changes(self) -> dict[CapKey, int]:
        """Current counts of every key changed since seeding or :meth:`mark_saved`."""
        return {key: self._counts[key] for key in self._changed}

    def mark_saved(self) -> None:
        """Forget the change set (call after persisting :meth:`changes`)."""
        self._changed.clear()


@dataclass(frozen=True)
class AwardDraft:
    """What one member earned in one aggregation (window)."""

    user_id: str
    currency: int
    rank_points: int
    event_count: int
    """All of the member's events in the input, including ignored and capped."""
    ignored: int
    """Events of unknown types."""
    capped: int
    """Events beyond a daily cap."""
    exact_currency: Decimal = Decimal(0)
    """The exact sum of the member's currency weights (``currency`` is its floor)."""
    exact_rank_points: Decimal = Decimal(0)
    """The exact sum of the member's rank-point weights (``rank_points`` is its floor)."""
    by_type: Mapping[str, TypeTally] | None = None
    """Per event type, what made the sums (``aggregate(..., explain=True)``; else None)."""
    exact_currency_months: Mapping[str, Decimal] = field(default_factory=dict)
    """``exact_currency`` split by the UTC month (``"YYYY-MM"``) the events occurred in:
    the lots the currency is credited to."""


@dataclass(frozen=True)
class AggregationResult:
    """Drafts per user id (in order of first appearance) and totals."""

    rule_version: int
    drafts: Mapping[str, AwardDraft]
    events: int
    ignored: int
    capped: int


@dataclass
class TypeTally:
    """One member's events of one type in an aggregation: how many, how many a daily cap
    stopped, how many earned with each multiplier (by its index in the rule), and the
    exact sums they added. ``known``: the rule set has a rule for the type."""

    known: bool
    events: int = 0
    capped: int = 0
    currency: Decimal = _ZERO
    rank_points: Decimal = _ZERO
    matched: dict[int, int] = field(default_factory=dict)
    earned: dict[int, int] = field(default_factory=dict)
    """While aggregating: events per weighing outcome (an index into the rule's
    ``_Weigher.entries``); the sums above are made of it once, at the end."""


@dataclass
class _Tally:
    currency: Decimal = _ZERO
    rank_points: Decimal = _ZERO
    events: int = 0
    ignored: int = 0
    capped: int = 0
    types: dict[str, TypeTally] | None = None
    months: dict[tuple[int, int], Decimal] = field(default_factory=dict)


class ActivityLike(Protocol):
    """What :func:`aggregate` reads of an activity (an :class:`Activity`, or any row
    with these attributes; ``occurred_at`` must be timezone-aware)."""

    @property
    def user_id(self) -> str: ...
    @property
    def event_type(self) -> str: ...
    @property
    def occurred_at(self) -> datetime: ...
    @property
    def attributes(self) -> Mapping[str, Any]: ...


_MISSING: Final = object()


def _signature(attributes: Mapping[str, Any], keys: tuple[str, ...]) -> tuple[Any, ...]:
    """What a rule's multipliers can see of ``attributes``: for each key they test, the
    value with its type (so True and 1 never share a memo entry)."""
    out: list[Any] = []
    for key in keys:
        value = attributes.get(key, _MISSING)
        if value is _MISSING or value is None or isinstance(value, str | int | float | bool):
            out.append((type(value), value))
        else:  # a list or an object never equals a multiplier's scalar
            out.append((object, None))
    return tuple(out)


class _Weigher:
    """weigh() with the result memoized per rule and attribute signature: exact and
    identical to weighing each event, without Decimal work per event."""

    def __init__(self, rule: Rule) -> None:
        self.rule = rule
        self.keys = tuple(sorted({k for m in rule.multipliers for k in m.when}))
        self.constant = None if self.keys else weigh_parts(rule, {})
        self.memo: dict[tuple[Any, ...], tuple[Decimal, Decimal]] = {}
        self.explained_memo: dict[tuple[Any, ...], int] = {}
        self.entries: list[tuple[Decimal, Decimal, tuple[int, ...]]] = []
        """Each distinct weighing outcome: weights and the matching multipliers."""

    def explained(self, attributes: Mapping[str, Any]) -> int:
        """The index in ``entries`` of the outcome for ``attributes`` (memoized)."""
        signature = _signature(attributes, self.keys) if self.keys else ()
        found = self.explained_memo.get(signature)
        if found is None:
            currency, points = weigh_parts(self.rule, attributes)
            matched = tuple(i for i, m in enumerate(self.rule.multipliers) if m.matches(attributes))
            found = self.explained_memo[signature] = len(self.entries)
            self.entries.append((currency, points, matched))
        return found

    def settle(self, line: TypeTally) -> None:
        """Turn ``line.earned`` into its exact sums and multiplier counts."""
        for index, n in line.earned.items():
            currency, points, matched = self.entries[index]
            count = Decimal(n)
            line.currency = _EXACT.add(line.currency, _EXACT.multiply(currency, count))
            line.rank_points = _EXACT.add(line.rank_points, _EXACT.multiply(points, count))
            for m in matched:
                line.matched[m] = line.matched.get(m, 0) + n
        line.earned.clear()

    def __call__(self, attributes: Mapping[str, Any]) -> tuple[Decimal, Decimal]:
        if self.constant is not None:
            return self.constant
        signature = _signature(attributes, self.keys)
        found = self.memo.get(signature)
        if found is None:
            found = self.memo[signature] = weigh_parts(self.rule, attributes)
        return found


def weigh_parts(rule: Rule, attributes: Mapping[str, Any]) -> tuple[Decimal, Decimal]:
    factor = _ONE
    for multiplier in rule.multipliers:
        if multiplier.matches(attributes):
            factor = _EXACT.multiply(factor, multiplier.factor)
    return _EXACT.multiply(rule.currency, factor), _EXACT.multiply(rule.rank_points, factor)


def utc_date(activity: ActivityLike) -> date:
    """The UTC day an activity occurred on (the day its daily caps count against)."""
    occurred = activity.occurred_at
    if occurred.tzinfo is UTC:  # as the ingress log hands them out: no conversion
        return occurred.date()
    if occurred.utcoffset() is None:
        raise ValueError("occurred_at must be timezone-aware")
    return occurred.astimezone(UTC).date()


class WeighObserver(Protocol):
    """Told of every activity :func:`aggregate` sees, with the exact weight it counted
    (zero for an unknown type or an event beyond its daily cap): the daily rollups."""

    def weighed(self, activity: ActivityLike, currency: Decimal, rank_points: Decimal) -> None: ...


def aggregate(
    activities: Iterable[ActivityLike],
    rule_set: RuleSet,
    caps: CapCounter,
    observer: WeighObserver | None = None,
    *,
    explain: bool = False,
) -> AggregationResult:
    """Weigh and sum ``activities`` per member, in input order, applying daily caps.

    ``caps`` is read and updated in place, so consecutive windows aggregated with
    one shared counter cap exactly like a single aggregation of all of them. Per
    member, the exact decimal sum is rounded down once, at the end. ``observer`` (if
    any) is told each activity's counted weight. ``explain``: also tally per event type
    (``AwardDraft.by_type``), what award explanations are built of.
    """
    seen = observer.weighed if observer is not None else None
    tallies: dict[str, _Tally] = {}
    weighers: dict[str, _Weigher | None] = {}
    add = _EXACT.add
    for activity in activities:
        user_id = activity.user_id
        tally = tallies.get(user_id)
        if tally is None:
            tally = tallies[user_id] = _Tally(types={} if explain else None)
        tally.events += 1
        event_type = activity.event_type
        weigher = weighers.get(event_type, _MISSING)
        if weigher is _MISSING:
            rule = rule_set.rules.get(event_type)
            weigher = weighers[event_type] = None if rule is None else _Weigher(rule)
        line: TypeTally | None = None
        if tally.types is not None:
            line = tally.types.get(event_type)
            if line is None:
                line = tally.types[event_type] = TypeTally(known=weigher is not None)
            line.events += 1
        if weigher is None:
            tally.ignored += 1
            if seen is not None:
                seen(activity, _ZERO, _ZERO)
            continue
        assert isinstance(weigher, _Weigher)
        cap = weigher.rule.daily_cap
        if cap is not None and not caps.take((user_id, event_type, utc_date(activity)), cap):
            tally.capped += 1
            if line is not None:
                line.capped += 1
            if seen is not None:
                seen(activity, _ZERO, _ZERO)
            continue
        if line is None:
            currency, rank_points = weigher(activity.attributes)
        else:
            index = weigher.explained(activity.attributes)
            earned = line.earned
            earned[index] = earned.get(index, 0) + 1
            currency, rank_points = weigher.entries[index][0], weigher.entries[index][1]
        if seen is not None:
            seen(activity, currency, rank_points)
        if currency:
            occurred = activity.occurred_at
            if occurred.tzinfo is not UTC:
                occurred = occurred.astimezone(UTC)
            month = (occurred.year, occurred.month)
            months = tally.months
            months[month] = add(months.get(month, _ZERO), currency)
        tally.currency = add(tally.currency, currency)
        tally.rank_points = add(tally.rank_points, rank_points)

    if explain:
        for t in tallies.values():
            for event_type, line in (t.types or {}).items():
                found = weighers.get(event_type)
                if isinstance(found, _Weigher):
                    found.settle(line)

    drafts = {
        user_id: AwardDraft(
            user_id=user_id,
            currency=_floor(t.currency),
            rank_points=_floor(t.rank_points),
            event_count=t.events,
            ignored=t.ignored,
            capped=t.capped,
            exact_currency=t.currency,
            exact_rank_points=t.rank_points,
            by_type=t.types,
            exact_currency_months={f"{y:04d}-{m:02d}": v for (y, m), v in sorted(t.months.items())},
        )
        for user_id, t in tallies.items()
    }
    return AggregationResult(
        rule_version=rule_set.version,
        drafts=drafts,
        events=sum(t.events for t in tallies.values()),
        ignored=sum(t.ignored for t in tallies.values()),
        capped=sum(t.capped for t in tallies.values()),
    )


def _floor(value: Decimal) -> int:
    return int(_EXACT.to_integral_value(value))


exact_add: Final = _EXACT.add
"""``a + b`` exactly (one call, for hot loops)."""


def exact_sum(*values: Decimal) -> Decimal:
    """The exact sum of decimals (no rounding: the context is wide enough for any sum of
    bounded weights; the default context would round at 28 digits)."""
    total = _ZERO
    for value in values:
        total = _EXACT.add(total, value)
    return total


def exact_difference(a: Decimal, b: Decimal) -> Decimal:
    """``a - b`` exactly."""
    return _EXACT.subtract(a, b)


def split_whole(value: Decimal) -> tuple[int, Decimal]:
    """``(floor(value), value - floor(value))``, exactly: the whole units to credit and
    the remainder (in [0, 1)) to carry."""
    whole = _floor(value)
    return whole, _EXACT.subtract(value, Decimal(whole))
