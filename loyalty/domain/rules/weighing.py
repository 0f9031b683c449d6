"""Weighing: turn activity events into currency and rank points under a rule set.

Everything here is pure and deterministic: no I/O, no clock reads. Arithmetic is
exact (decimal); only the per-award total is rounded, and always down.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any, Final, Protocol

from loyalty.domain.ranks import is_int
from loyalty.domain.rules.exact import EXACT, ONE, ZERO, floor
from loyalty.domain.rules.model import CapKey, Rule, RuleSet


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
    currency: Decimal = ZERO
    rank_points: Decimal = ZERO
    matched: dict[int, int] = field(default_factory=dict)
    earned: dict[int, int] = field(default_factory=dict)
    """While aggregating: events per weighing outcome (an index into the rule's
    ``_Weigher.entries``); the sums above are made of it once, at the end."""


@dataclass
class _Tally:
    currency: Decimal = ZERO
    rank_points: Decimal = ZERO
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
            line.currency = EXACT.add(line.currency, EXACT.multiply(currency, count))
            line.rank_points = EXACT.add(line.rank_points, EXACT.multiply(points, count))
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
    factor = ONE
    for multiplier in rule.multipliers:
        if multiplier.matches(attributes):
            factor = EXACT.multiply(factor, multiplier.factor)
    return EXACT.multiply(rule.currency, factor), EXACT.multiply(rule.rank_points, factor)


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
    add = EXACT.add
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
                seen(activity, ZERO, ZERO)
            continue
        assert isinstance(weigher, _Weigher)
        cap = weigher.rule.daily_cap
        if cap is not None and not caps.take((user_id, event_type, utc_date(activity)), cap):
            tally.capped += 1
            if line is not None:
                line.capped += 1
            if seen is not None:
                seen(activity, ZERO, ZERO)
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
            months[month] = add(months.get(month, ZERO), currency)
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
            currency=floor(t.currency),
            rank_points=floor(t.rank_points),
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
