"""The daily report, read from the rollups alone (a day reads the same after retention
dropped its activity): figures per day, their labels, the console's today figures."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import date, timedelta
from decimal import Decimal
from typing import Any, Protocol

from loyalty.application.reporting.rollups import AccountDay, ActivityKey
from loyalty.domain.rules import decimal_to_wire, exact_sum
from loyalty.domain.sketch import estimate, merge


@dataclass(frozen=True, slots=True)
class ActivityRow:
    source: str
    event_type: str
    events: int
    earning_events: int
    members: int
    """Distinct members (a HyperLogLog estimate, ~1.6 % standard error)."""
    currency_awarded: Decimal
    rank_points_awarded: Decimal

    def to_wire(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "event_type": self.event_type,
            "events": self.events,
            "earning_events": self.earning_events,
            "members": self.members,
            "currency_awarded": decimal_to_wire(self.currency_awarded),
            "rank_points_awarded": decimal_to_wire(self.rank_points_awarded),
        }


DAY_COLUMNS: tuple[str, ...] = (
    "day",
    "events",
    "earning_events",
    "active_members",
    "currency_awarded",
    "rank_points_awarded",
    "currency_credited",
    "rank_points_credited",
    "currency_spent",
    "currency_refunded",
    "currency_adjusted",
    "rank_points_adjusted",
    "currency_expired",
    "currency_forgotten",
    "new_members",
    "members",
    "members_with_balance",
    "outstanding_currency",
)
"""The scalar figures of a day's report, in the order of its JSON (``DayReport.to_wire``
adds ``members_per_rank`` and ``activity``): the export's and the console's columns."""

FIGURE_LABELS: dict[str, str] = {
    "day": "Day (UTC)",
    "events": "Events",
    "earning_events": "Events that earned",
    "active_members": "Active members",
    "currency_awarded": "Currency awarded (exact weights)",
    "rank_points_awarded": "Rank points awarded (exact weights)",
    "currency_credited": "Currency credited (whole units)",
    "rank_points_credited": "Rank points credited (whole units)",
    "currency_spent": "Currency spent",
    "currency_refunded": "Currency refunded",
    "currency_adjusted": "Currency adjusted",
    "rank_points_adjusted": "Rank points adjusted",
    "currency_expired": "Currency expired",
    "currency_forgotten": "Currency forgotten (forget-me)",
    "new_members": "New members",
    "members": "Members",
    "members_with_balance": "Members with a balance",
    "outstanding_currency": "Outstanding currency (end of day)",
}
"""One label per figure of the report, the same wherever it is shown: the console's
dashboard and reports page, ``loyalty report`` and the API's schema. *Awarded* is the
exact sum of the events' weights (the pipeline's view); *credited* is what reached
members' balances in whole units (it trails *awarded* by the fractions still carried and
the earnings still pending)."""

TODAY_FIGURES: tuple[str, ...] = (
    "events",
    "currency_awarded",
    "currency_credited",
    "currency_spent",
    "currency_refunded",
    "currency_adjusted",
    "outstanding_currency",
)
"""The figures of today the console's dashboard shows (from :func:`daily_report`, the
report's own source: the dashboard and ``GET /v1/reports/daily`` cannot disagree)."""


def today_report(reader: RollupReader, today: date) -> dict[str, Any]:
    """Today's report as the API answers it (``GET /v1/reports/daily?from=today&to=today``)."""
    return daily_report(reader, today, today)[0].to_wire()


@dataclass(frozen=True, slots=True)
class DayReport:
    day: date
    activity: list[ActivityRow]
    active_members: int
    """Distinct members with any activity that day (the day's sketches merged)."""
    changes: AccountDay
    outstanding_currency: int
    members: int
    members_with_balance: int
    members_per_rank: dict[str, int]
    unweighed_types: dict[str, int] = field(default_factory=dict)
    """The day's events per type that no rule of the current rule set weighs (accepted,
    earning nothing now; issue 32 item 2): empty when the report was asked without the
    rule set."""

    @property
    def events(self) -> int:
        return sum(r.events for r in self.activity)

    @property
    def earning_events(self) -> int:
        return sum(r.earning_events for r in self.activity)

    @property
    def currency_awarded(self) -> Decimal:
        return exact_sum(*(r.currency_awarded for r in self.activity))

    @property
    def rank_points_awarded(self) -> Decimal:
        return exact_sum(*(r.rank_points_awarded for r in self.activity))

    def to_wire(self) -> dict[str, Any]:
        c = self.changes
        return {
            "day": self.day.isoformat(),
            "events": self.events,
            "earning_events": self.earning_events,
            "active_members": self.active_members,
            "currency_awarded": decimal_to_wire(self.currency_awarded),
            "rank_points_awarded": decimal_to_wire(self.rank_points_awarded),
            "currency_credited": c.currency_credited,
            "rank_points_credited": c.rank_points_credited,
            "currency_spent": c.currency_spent,
            "currency_refunded": c.currency_refunded,
            "currency_adjusted": c.currency_adjusted,
            "rank_points_adjusted": c.rank_points_adjusted,
            "currency_expired": c.currency_expired,
            "currency_forgotten": c.currency_forgotten,
            "new_members": c.new_members,
            "members": self.members,
            "members_with_balance": self.members_with_balance,
            "members_per_rank": dict(sorted(self.members_per_rank.items())),
            "outstanding_currency": self.outstanding_currency,
            "activity": [r.to_wire() for r in self.activity],
            "unweighed_types": dict(sorted(self.unweighed_types.items())),
        }


@dataclass(frozen=True, slots=True)
class StoredActivity:
    """A stored activity rollup row (one shard's share of a day x source x type)."""

    day: date
    source: str
    event_type: str
    events: int
    earning_events: int
    currency: Decimal
    rank_points: Decimal
    sketch: bytes | bytearray


class RollupReader(Protocol):
    def activity(self, first: date, last: date) -> list[StoredActivity]: ...
    def accounts(self, last: date) -> dict[date, AccountDay]:
        """Every stored account day up to ``last`` (the levels need all of them)."""
        ...


MAX_REPORT_DAYS = 3660


class ReportRangeError(ValueError):
    pass


def check_range(first: date, last: date) -> None:
    if last < first:
        raise ReportRangeError("`to` is before `from`")
    if (last - first).days >= MAX_REPORT_DAYS:
        raise ReportRangeError(f"at most {MAX_REPORT_DAYS} days per report")


def daily_report(
    reader: RollupReader, first: date, last: date, weighed: Collection[str] | None = None
) -> list[DayReport]:
    """One entry per day from ``first`` to ``last`` (inclusive), from the rollups alone:
    the same before and after retention dropped the days' activity. ``weighed``: the
    event types the current rule set weighs; each day then says how many of its events
    were of a type outside them (``unweighed_types``)."""
    check_range(first, last)
    cells: dict[ActivityKey, StoredActivity] = {}
    sketches: dict[ActivityKey, bytearray] = {}
    for row in reader.activity(first, last):
        key = (row.day, row.source, row.event_type)
        found = cells.get(key)
        if found is None:
            cells[key] = row
            sketches[key] = bytearray(row.sketch)
        else:
            cells[key] = StoredActivity(
                row.day,
                row.source,
                row.event_type,
                found.events + row.events,
                found.earning_events + row.earning_events,
                exact_sum(found.currency, row.currency),
                exact_sum(found.rank_points, row.rank_points),
                b"",
            )
            sketches[key] = merge(sketches[key], row.sketch)
    accounts = reader.accounts(last)
    level = AccountDay()
    for day in sorted(d for d in accounts if d < first):
        level.add(accounts[day])
    out: list[DayReport] = []
    day = first
    while day <= last:
        changes = accounts.get(day, AccountDay())
        level.add(changes)
        keys = sorted(k for k in cells if k[0] == day)
        rows = [
            ActivityRow(
                k[1],
                k[2],
                cells[k].events,
                cells[k].earning_events,
                estimate(sketches[k]),
                cells[k].currency,
                cells[k].rank_points,
            )
            for k in keys
        ]
        unweighed: dict[str, int] = {}
        if weighed is not None:
            for line in rows:
                if line.event_type not in weighed and line.events:
                    unweighed[line.event_type] = unweighed.get(line.event_type, 0) + line.events
        day_sketch = bytearray()
        for k in keys:
            day_sketch = sketches[k] if not day_sketch else merge(day_sketch, sketches[k])
        out.append(
            DayReport(
                day=day,
                activity=rows,
                active_members=estimate(day_sketch) if day_sketch else 0,
                changes=changes,
                outstanding_currency=level.outstanding_change,
                members=level.members_change,
                members_with_balance=level.holders_change,
                members_per_rank={r: n for r, n in level.ranks.items() if n},
                unweighed_types=unweighed,
            )
        )
        day += timedelta(days=1)
    return out
