"""How a window's earnings accumulate in the pending rows, and which rows are due now.

Pure: no I/O, no clock (the commit's moment comes in as ``now``). The pipeline's store
loads the rows of a window's members (locked, in the checkpoint's transaction), calls
:func:`accumulate` and stores what it returns in that same transaction; see
``loyalty.application.pending`` for the recording side.

What :func:`accumulate` guarantees (``tests/unit/domain/test_pending.py``):

- exact sums: a row's currency, rank points, event count and months are its held values
  plus the contribution's, added exactly; folding windows one by one gives the same row
  as adding their sum at once (once the row exists: a window of nothing, capped or
  unknown events only, starts no row, so its counts are not kept);
- the months sum to the currency, and the explanation's totals to the amounts, when
  the held row's and the contributions' do;
- a rank need is kept only under the rules version it was noted under (another ladder
  derives it again); a row is due now (``settle``) when its need is unknown (a new row,
  a new rules version) or its rank points reach it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from loyalty.domain import explain
from loyalty.domain.expiry import month_of
from loyalty.domain.explain import Summary
from loyalty.domain.rules import exact_sum

Position = tuple[int, int]


@dataclass(frozen=True, slots=True)
class Contribution:
    """One window's exact earnings of one member."""

    user_id: str
    currency: Decimal
    rank_points: Decimal
    event_count: int
    rule_version: int
    summary: Summary | None = None
    """Why (``loyalty.domain.explain``); a contribution of nothing (events capped or of
    unknown types only) only adds its counts to a row that exists."""
    months: Mapping[str, Decimal] | None = None
    """``currency`` by the month (``"YYYY-MM"``) it was earned in (None: unknown)."""


@dataclass(frozen=True, slots=True)
class PendingRow:
    user_id: str
    shard: int
    currency: Decimal
    rank_points: Decimal
    event_count: int
    rule_version: int
    upto: Position
    """End of the last window that changed the row: its revision and award id."""
    since: datetime
    """When the oldest unrecorded contribution was committed."""
    rank_need: Decimal | None
    """Rank points (exact) at which recording the row lifts the rank, noted when the row
    was settled (``Member.rank_need`` as of the row's day, under the ladder of the row's
    ``rule_version``); None: not known yet (a new row, or a new rules version).
    Infinite: no rank above."""
    months: Mapping[str, Decimal] | None = None
    """``currency`` by the month it was earned in (issue 19); None for a row stored
    before months were kept: credited to the month of ``since``."""

    def lifts_rank(self) -> bool:
        return self.rank_need is not None and self.rank_points >= self.rank_need


@dataclass(frozen=True, slots=True)
class Held:
    """A pending row with its explanation: as loaded, and as :func:`accumulate` returns
    it to be stored."""

    row: PendingRow
    summary: Summary | None = None


@dataclass(frozen=True, slots=True)
class Accumulation:
    rows: tuple[Held, ...]
    """The rows to store (insert or update), in the contributions' order."""
    settle: tuple[PendingRow, ...]
    """Of those, the rows to record now: rank need unknown, or reached."""


def merge_months(
    before: Mapping[str, Decimal] | None,
    before_currency: Decimal,
    since: datetime,
    added: Contribution,
) -> dict[str, Decimal]:
    """The row's months plus the contribution's (a row without months, stored before
    they were kept, counts as earned in the month of its ``since``; so does a
    contribution without them)."""
    months = dict(before) if before is not None else {}
    if before is None and before_currency:
        months[month_of(since)] = before_currency
    extra = added.months if added.months is not None else {month_of(since): added.currency}
    for month, value in extra.items():
        months[month] = exact_sum(months.get(month, Decimal(0)), value)
    return months


def accumulate(
    held: Mapping[str, Held],
    contributions: Sequence[Contribution],
    shard: int,
    end: Position,
    now: datetime,
) -> Accumulation:
    """Add one window (of ``shard``, ending at ``end``, committed at ``now``) to the
    ``held`` rows of its members. A contributing member without a held row starts one
    (``since`` = ``now``, need unknown) unless it contributes nothing. Raises ValueError
    if a member contributes twice (one window gives one contribution per member)."""
    seen: set[str] = set()
    rows: list[Held] = []
    settle: list[PendingRow] = []
    for c in contributions:
        if c.user_id in seen:
            raise ValueError(f"two contributions of one member in one window: {c.user_id}")
        seen.add(c.user_id)
        before = held.get(c.user_id)
        if before is None:
            if not (c.currency or c.rank_points):
                continue  # only capped or unknown events: no row to explain them in
            row = PendingRow(
                c.user_id,
                shard,
                c.currency,
                c.rank_points,
                c.event_count,
                c.rule_version,
                end,
                now,
                None,
                merge_months({}, Decimal(0), now, c),
            )
            summary = c.summary
        else:
            b = before.row
            row = PendingRow(
                c.user_id,
                shard,
                exact_sum(b.currency, c.currency),
                exact_sum(b.rank_points, c.rank_points),
                b.event_count + c.event_count,
                c.rule_version,
                end,
                b.since,
                # a need noted under another rules version (another ladder) is derived again
                b.rank_need if b.rule_version == c.rule_version else None,
                merge_months(b.months, b.currency, b.since, c),
            )
            summary = None if c.summary is None else explain.merge(before.summary, c.summary)
        rows.append(Held(row, summary))
        if row.rank_need is None or row.rank_points >= row.rank_need:
            settle.append(row)
    return Accumulation(tuple(rows), tuple(settle))
