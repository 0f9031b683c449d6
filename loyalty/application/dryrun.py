"""Rule dry run: what a candidate rule set would have awarded over a retained period,
compared with the current rules on the same events.

Read-only. The period is whole UTC days ``[first, end)`` inside the retained ingress
(refused otherwise: :class:`PeriodNotRetained`). It streams day by day and, within a day,
shard by shard in chunks, in the pipeline's own order (``(txid, seq)``), and weighs each
chunk with the one implementation of the rules (``loyalty.domain.rules.aggregate``) under
both rule sets, each with its own daily-cap counter per (shard, day): a member's events
all live in one shard and a cap counts per UTC day, so the caps fall exactly where the
pipeline puts them. Only per-member sums are held, never the events.

Both sides are exact decimal sums before rounding (the pipeline credits floor of the
running exact total, see ``pending``); "current" is the current rule version applied to
the same events (the baseline of a comparison, also when the period's events were
weighed under an older version).
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any, Protocol

from loyalty.application.pipeline import IngressRow, RulesSource
from loyalty.domain import explain
from loyalty.domain.errors import PeriodNotRetained
from loyalty.domain.rules import (
    AggregationResult,
    CapCounter,
    RuleSet,
    aggregate,
    decimal_to_wire,
    exact_difference,
    exact_sum,
)

Position = tuple[int, int]
BEFORE_ALL: Position = (-1, -1)
TOP = 20
_ZERO = Decimal(0)


class DayReader(Protocol):
    def read_day(
        self,
        day: date,
        shard: int,
        after: Position,
        limit: int,
        received_before: datetime | None = None,
    ) -> Sequence[IngressRow]:
        """Rows of ``shard`` that occurred on ``day``, past ``after`` in (txid, seq)
        order, at most ``limit`` (only those received before ``received_before``)."""
        ...


RankPoints = Callable[[Sequence[str]], dict[str, int]]
"""The members' recorded rank points (members without a row: absent)."""


def _day_of(text: str, what: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise PeriodNotRetained(f"{what} {text!r}: not a date (YYYY-MM-DD)") from None


@dataclass
class _Side:
    currency: Decimal = _ZERO
    rank_points: Decimal = _ZERO


@dataclass
class _TypeTotals:
    events: int = 0
    current_capped: int = 0
    candidate_capped: int = 0
    current: _Side = field(default_factory=_Side)
    candidate: _Side = field(default_factory=_Side)


@dataclass
class MemberDifference:
    user_id: str
    current: _Side = field(default_factory=_Side)
    candidate: _Side = field(default_factory=_Side)
    current_summary: explain.Summary | None = None
    candidate_summary: explain.Summary | None = None

    @property
    def currency(self) -> Decimal:
        return exact_difference(self.candidate.currency, self.current.currency)

    @property
    def rank_points(self) -> Decimal:
        return exact_difference(self.candidate.rank_points, self.current.rank_points)


@dataclass
class Comparison:
    first: date
    end: date
    current: RuleSet
    candidate: RuleSet
    events: int = 0
    members: dict[str, MemberDifference] = field(default_factory=dict)
    types: dict[str, _TypeTotals] = field(default_factory=dict)
    seconds: float = 0.0


def _add(side: _Side, currency: Decimal, points: Decimal) -> None:
    side.currency = exact_sum(side.currency, currency)
    side.rank_points = exact_sum(side.rank_points, points)


def _wire(value: Decimal) -> int | str:
    return decimal_to_wire(value)


def _pair(current: _Side, candidate: _Side) -> dict[str, Any]:
    return {
        "current": _wire(current.currency),
        "candidate": _wire(candidate.currency),
        "difference": _wire(exact_difference(candidate.currency, current.currency)),
    }


def _pair_points(current: _Side, candidate: _Side) -> dict[str, Any]:
    return {
        "current": _wire(current.rank_points),
        "candidate": _wire(candidate.rank_points),
        "difference": _wire(exact_difference(candidate.rank_points, current.rank_points)),
    }


class DryRun:
    def __init__(
        self,
        reader: DayReader,
        rules: RulesSource,
        rank_points: RankPoints,
        *,
        retention_days: int,
        shard_count: int,
        clock: Callable[[], datetime],
        chunk: int = 5000,
        duty: float = 1.0,
    ) -> None:
        self._reader = reader
        self._rules = rules
        self._rank_points = rank_points
        self._retention_days = retention_days
        self._shards = shard_count
        self._clock = clock
        self.chunk = chunk
        self.duty = duty
        """Fraction of the time spent working: after each chunk it sleeps the chunk's
        time x (1/duty - 1), leaving the pipeline its share of CPU (1: never sleeps)."""

    def period(self, first: str | date | None, last: str | date | None) -> tuple[date, date]:
        """``first`` .. ``last``, both included (the convention of the daily report and the
        console), checked against retention; as ``[start, end)`` dates. By default the
        period ends today (so today's events count) and starts the day before; ``from``
        alone runs through today."""
        today = self._clock().astimezone(UTC).date()
        through = (
            _day_of(last, "to") if isinstance(last, str) else last if last is not None else today
        )
        start = (
            _day_of(first, "from")
            if isinstance(first, str)
            else first
            if first is not None
            else min(through, today) - timedelta(days=1)
        )
        oldest = (self._clock() - timedelta(days=self._retention_days)).astimezone(UTC).date()
        if through < start:
            raise PeriodNotRetained(
                f"the period {start} to {through} is empty: 'to' (the last day, included) "
                f"must be on or after 'from'"
            )
        if start < oldest:
            raise PeriodNotRetained(
                f"{start} is outside retention: the oldest retained day is {oldest} "
                f"(LOYALTY_RETENTION_DAYS={self._retention_days})"
            )
        if through > today:
            raise PeriodNotRetained(f"{through} is in the future: the period ends by {today}")
        return start, through + timedelta(days=1)

    def compare(
        self,
        candidate: RuleSet,
        first: date,
        end: date,
        *,
        current: RuleSet | None = None,
        received_before: datetime | None = None,
        summaries: bool = False,
        upto: Mapping[int, Position] | None = None,
        skip: Callable[[IngressRow], bool] | None = None,
    ) -> Comparison:
        """Weigh the period under ``current`` (default: the current rules) and
        ``candidate``. ``summaries``: keep each member's per-type summaries (for the
        explanation of a compensation). ``upto``: per shard, only rows at or before
        this position (a compensation: what was weighed under older versions).
        ``skip``: rows left out (a compensation: events of forgotten members)."""
        started = time.monotonic()
        baseline = current if current is not None else self._rules.current()
        result = Comparison(first, end, baseline, candidate)
        for rows_cur, rows_cand, count in self._chunks(
            baseline, candidate, first, end, received_before, summaries, upto, skip
        ):
            result.events += count
            self._fold(result, rows_cur, rows_cand, summaries)
        result.seconds = time.monotonic() - started
        return result

    def _chunks(
        self,
        current: RuleSet,
        candidate: RuleSet,
        first: date,
        end: date,
        received_before: datetime | None,
        summaries: bool,
        upto: Mapping[int, Position] | None = None,
        skip: Callable[[IngressRow], bool] | None = None,
    ) -> Iterator[tuple[AggregationResult, AggregationResult, int]]:
        day = first
        while day < end:
            for shard in range(self._shards):
                caps_current, caps_candidate = CapCounter(), CapCounter()
                after = BEFORE_ALL
                bound = None if upto is None else upto.get(shard, BEFORE_ALL)
                while True:
                    started = time.monotonic()
                    read = self._reader.read_day(day, shard, after, self.chunk, received_before)
                    if not read:
                        break
                    after = read[-1].position
                    rows = read if bound is None else [r for r in read if r.position <= bound]
                    more = len(rows) == len(read) >= self.chunk  # a full chunk, none past
                    if skip is not None:
                        rows = [r for r in rows if not skip(r)]
                    if rows:
                        yield (
                            aggregate(rows, current, caps_current, explain=True),
                            aggregate(rows, candidate, caps_candidate, explain=True),
                            len(rows),
                        )
                    if self.duty < 1:
                        time.sleep((time.monotonic() - started) * (1 / self.duty - 1))
                    if not more:
                        break
            day += timedelta(days=1)

    def _fold(
        self,
        result: Comparison,
        current: AggregationResult,
        candidate: AggregationResult,
        summaries: bool,
    ) -> None:
        for side, aggregation, rule_set in (
            ("current", current, result.current),
            ("candidate", candidate, result.candidate),
        ):
            for user_id, draft in aggregation.drafts.items():
                member = result.members.get(user_id)
                if member is None:
                    member = result.members[user_id] = MemberDifference(user_id)
                _add(getattr(member, side), draft.exact_currency, draft.exact_rank_points)
                if summaries:
                    name = f"{side}_summary"
                    setattr(
                        member,
                        name,
                        explain.merge(getattr(member, name), explain.summarize(draft, rule_set)),
                    )
                for event_type, line in (draft.by_type or {}).items():
                    totals = result.types.get(event_type)
                    if totals is None:
                        totals = result.types[event_type] = _TypeTotals()
                    _add(getattr(totals, side), line.currency, line.rank_points)
                    if side == "current":
                        totals.events += line.events
                        totals.current_capped += line.capped
                    else:
                        totals.candidate_capped += line.capped

    def run(
        self, candidate: RuleSet, first: str | date | None, end: str | date | None
    ) -> dict[str, Any]:
        """The dry run's report (JSON-ready; the shape is documented in docs/api.md)."""
        start, stop = self.period(first, end)
        return self.report(self.compare(candidate, start, stop))

    def report(self, result: Comparison) -> dict[str, Any]:
        total_current, total_candidate = _Side(), _Side()
        for member in result.members.values():
            _add(total_current, member.current.currency, member.current.rank_points)
            _add(total_candidate, member.candidate.currency, member.candidate.rank_points)
        changed = [m for m in result.members.values() if m.currency or m.rank_points]
        recorded = self._rank_points([m.user_id for m in changed]) if changed else {}
        rank_differs = 0
        ranks: dict[str, tuple[str | None, str | None]] = {}
        moved = {m.user_id for m in result.members.values()}
        if result.current.ranks != result.candidate.ranks:  # a new ladder moves anyone
            recorded = self._rank_points(sorted(moved))
        else:
            moved = {m.user_id for m in changed}
        for user_id in moved:
            member = result.members[user_id]
            base = Decimal(recorded.get(user_id, 0))
            after = max(_ZERO, exact_sum(base, member.rank_points))
            now_rank = result.current.ranks.rank_for(int(base))
            new_rank = result.candidate.ranks.rank_for(int(after))
            names = (
                None if now_rank is None else now_rank.name,
                None if new_rank is None else new_rank.name,
            )
            ranks[user_id] = names
            if names[0] != names[1]:
                rank_differs += 1
        largest = heapq.nlargest(
            TOP, changed, key=lambda m: (abs(m.currency), abs(m.rank_points), m.user_id)
        )
        through = result.end - timedelta(days=1)
        warnings = (
            [
                f"no retained events from {result.first} to {through} (both included): "
                "nothing was weighed; choose days with events (--from/--to)"
            ]
            if result.events == 0
            else []
        )
        return {
            "period": {"from": result.first.isoformat(), "to": through.isoformat()},
            "warnings": warnings,
            "current_version": result.current.version,
            "events": result.events,
            "members": len(result.members),
            "members_with_difference": len(changed),
            "members_with_different_rank": rank_differs,
            "totals": {
                "currency": _pair(total_current, total_candidate),
                "rank_points": _pair_points(total_current, total_candidate),
            },
            "largest_differences": [
                {
                    "user_id": m.user_id,
                    "currency": _pair(m.current, m.candidate),
                    "rank_points": _pair_points(m.current, m.candidate),
                    "rank": {
                        "current": ranks.get(m.user_id, (None, None))[0],
                        "candidate": ranks.get(m.user_id, (None, None))[1],
                    },
                }
                for m in largest
            ],
            "by_event_type": [
                {
                    "event_type": event_type,
                    "events": t.events,
                    "capped": {"current": t.current_capped, "candidate": t.candidate_capped},
                    "currency": _pair(t.current, t.candidate),
                    "rank_points": _pair_points(t.current, t.candidate),
                }
                for event_type, t in sorted(result.types.items())
            ],
            "seconds": round(result.seconds, 3),
        }
