"""Exact decimal arithmetic for weights: a context wide enough that products of bounded
weights and factors, and their sums, are exact; rounding (only ever used explicitly for
totals) is floor."""

from __future__ import annotations

from decimal import ROUND_FLOOR, Context, Decimal, DivisionByZero, InvalidOperation, Overflow
from typing import Final

EXACT: Final = Context(
    prec=2000,
    rounding=ROUND_FLOOR,
    traps=[InvalidOperation, DivisionByZero, Overflow],
)
ONE: Final = Decimal(1)
ZERO: Final = Decimal(0)


def floor(value: Decimal) -> int:
    """``value`` rounded down to an integer."""
    return int(EXACT.to_integral_value(value))


def decimal_to_wire(value: Decimal) -> int | str:
    """Integral values as ints, others as plain decimal strings ("1.5")."""
    if value == value.to_integral_value(context=EXACT):
        return int(value)
    return format(value.normalize(EXACT), "f")


exact_add: Final = EXACT.add
"""``a + b`` exactly (one call, for hot loops)."""


def exact_sum(*values: Decimal) -> Decimal:
    """The exact sum of decimals (no rounding: the context is wide enough for any sum of
    bounded weights; the default context would round at 28 digits)."""
    total = ZERO
    for value in values:
        total = EXACT.add(total, value)
    return total


def exact_difference(a: Decimal, b: Decimal) -> Decimal:
    """``a - b`` exactly."""
    return EXACT.subtract(a, b)


def split_whole(value: Decimal) -> tuple[int, Decimal]:
    """``(floor(value), value - floor(value))``, exactly: the whole units to credit and
    the remainder (in [0, 1)) to carry."""
    whole = floor(value)
    return whole, EXACT.subtract(value, Decimal(whole))
