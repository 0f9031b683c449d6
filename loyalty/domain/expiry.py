"""Currency lots and rank qualification periods: pure arithmetic, no clock, no I/O.

A member's currency is kept in *lots* by the UTC month it was earned (``"YYYY-MM"``);
currency stored before lots were tracked is one legacy lot (:data:`LEGACY`, sorting before
every month). Spends take the oldest currency first (FIFO), a refund puts an order's
amount back into the lots it came from, and under a :class:`CurrencyExpiry` rule a lot
earned in month M expires at the end of month M + ``after_months`` (the instant the
month after that begins, UTC). At most ``after_months`` + 1 dated lots are open per
member under a rule, whatever the member's activity.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Final

LEGACY: Final = "0000-00"
"""The lot of currency stored before lots were tracked (sorts before every month)."""

MONTH_PATTERN: Final = re.compile(r"([0-9]{4})-(0[1-9]|1[0-2])")
MAX_AFTER_MONTHS: Final = 1200


def is_month(value: object) -> bool:
    """True for a ``"YYYY-MM"`` month (year 0001 or later) or the legacy lot."""
    if not isinstance(value, str):
        return False
    if value == LEGACY:
        return True
    match = MONTH_PATTERN.fullmatch(value)
    return match is not None and int(match.group(1)) >= 1


def month_of(moment: datetime | date) -> str:
    """The UTC month ``"YYYY-MM"`` of an aware datetime (or of a date)."""
    if isinstance(moment, datetime):
        if moment.utcoffset() is None:
            raise ValueError("moment must be timezone-aware")
        moment = moment.astimezone(UTC)
    return f"{moment.year:04d}-{moment.month:02d}"


def add_months(month: str, count: int) -> str:
    """``month`` plus ``count`` months (``"2024-11" + 3 == "2025-02"``)."""
    year, mon = int(month[:4]), int(month[5:7])
    index = year * 12 + (mon - 1) + count
    return f"{index // 12:04d}-{index % 12 + 1:02d}"


def month_start(month: str) -> datetime:
    """The first instant of ``month``, UTC."""
    return datetime(int(month[:4]), int(month[5:7]), 1, tzinfo=UTC)


def lot_order(lot: str) -> str:
    """Sort key of lots: oldest first (the legacy lot before every month)."""
    return lot


@dataclass(frozen=True)
class CurrencyExpiry:
    """Currency earned in month M expires at the end of month M + ``after_months``.

    Lots earned before ``effective_from`` (and the legacy lot) never expire unless
    ``retroactive``: then every dated lot expires by its month and the legacy lot as if
    earned in ``effective_from``. ``effective_from`` is stamped with the month the rule
    was turned on when the operator leaves it out (see ``loyalty.application.rules``)."""

    after_months: int
    effective_from: str | None = None
    retroactive: bool = False
    at: str = "month_end"

    def expires_at(self, lot: str) -> datetime | None:
        """The instant ``lot`` expires under this rule; None if it never does."""
        return _expires_at(lot, self.after_months, self.effective_from, self.retroactive)

    def last_expired_lot(self, as_of: datetime) -> str:
        """The newest month whose lots have expired at ``as_of`` (each older one too)."""
        return add_months(month_of(as_of), -(self.after_months + 1))


@functools.lru_cache(maxsize=4096)
def _expires_at(
    lot: str, after_months: int, effective_from: str | None, retroactive: bool
) -> datetime | None:
    """:meth:`CurrencyExpiry.expires_at`, remembered: the expiry job asks it of every due
    index row and of every lot of every member it reads (a few distinct months in all;
    the arithmetic and the ``datetime`` were 4 % of a run)."""
    if lot == LEGACY:
        if not retroactive or effective_from is None:
            return None
        lot = effective_from
    elif not retroactive and effective_from is not None and lot < effective_from:
        return None
    return month_start(add_months(lot, after_months + 1))


def credit(lots: dict[str, int], lot: str, amount: int) -> None:
    """Add ``amount`` (>= 0) to ``lot``."""
    if amount:
        lots[lot] = lots.get(lot, 0) + amount


def debit_fifo(lots: dict[str, int], amount: int) -> dict[str, int]:
    """Take ``amount`` from the oldest lots first; returns what was taken per lot. The
    caller has checked the balance (the sum of the lots) covers it."""
    taken: dict[str, int] = {}
    rest = amount
    for lot in sorted(lots, key=lot_order):
        if rest <= 0:
            break
        part = min(lots[lot], rest)
        if part:
            taken[lot] = part
            lots[lot] -= part
            rest -= part
        if lots[lot] == 0:
            del lots[lot]
    if rest > 0:
        raise ValueError("debit exceeds the lots")
    return taken


@dataclass(frozen=True, slots=True)
class Expiring:
    """An amount that will expire at the end of ``on`` (a date) if not spent first."""

    amount: int
    on: date


def expiring(lots: Mapping[str, int], rule: CurrencyExpiry | None) -> list[Expiring]:
    """The member's next expiries under ``rule``, soonest first (one per lot date)."""
    if rule is None:
        return []
    by_date: dict[date, int] = {}
    for lot, amount in lots.items():
        when = rule.expires_at(lot)
        if when is None or amount <= 0:
            continue
        day = (when - timedelta(days=1)).date()
        by_date[day] = by_date.get(day, 0) + amount
    return [Expiring(amount, day) for day, amount in sorted(by_date.items())]
