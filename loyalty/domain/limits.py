"""The limits of what any entrypoint may store, defined once.

The domain's command methods (``loyalty.domain.member``) refuse a value outside them
with :class:`~loyalty.domain.errors.InvalidAmount`, whoever calls them; the
command models (``loyalty.application.commands``), which every entrypoint uses, publish
the same limits (422 naming the field) so a request is refused before it reaches the
domain. A new entrypoint cannot store more than these, even if it parses its own way.

- amounts: an order's amount in ``[1, MAX_AMOUNT]``; an adjustment's currency and rank
  points in ``[-MAX_AMOUNT, MAX_AMOUNT]``; a balance never beyond ``MAX_BALANCE`` (the
  read models store balances as 64-bit integers);
- ids (order, adjustment): 1 to ``MAX_ID_LENGTH`` characters, no control character
  (``PRINTABLE``: they break logs, CSV exports and COPY);
- reasons: 1 to ``MAX_REASON_LENGTH`` printable characters;
- days (reports, dry runs, expiry dates): ``MIN_DAY`` .. ``MAX_DAY``, far enough from
  ``date.min``/``date.max`` that a day's arithmetic (a period, the day after) never
  overflows;
- integers that address stored rows (rule versions): ``0 .. MAX_STORED_INT``.
"""

from __future__ import annotations

import re
from datetime import date

from loyalty.domain.errors import InvalidAmount

MAX_AMOUNT = 10**12
"""The largest amount of one command (spend, refund, adjustment), in currency or points."""
MAX_STORED_INT = 2**63 - 1
"""The largest integer a read model or a table stores (SQLite INTEGER, PostgreSQL bigint)."""
MAX_BALANCE = 10**15
"""The largest balance (currency, rank points) a command may leave on an account."""
MAX_ID_LENGTH = 128
MAX_REASON_LENGTH = 256
PRINTABLE_PATTERN = r"^[^\x00-\x1f\x7f]+$"
"""Text without control characters (pydantic's ``pattern`` and the domain's check)."""
_PRINTABLE = re.compile(PRINTABLE_PATTERN)
MIN_DAY = date(1970, 1, 1)
MAX_DAY = date(9000, 12, 31)


def check_amount(value: object, what: str, *, minimum: int) -> int:
    """``value`` as an amount in ``[minimum, MAX_AMOUNT]`` (bool and float refused)."""
    if type(value) is not int:
        raise InvalidAmount(f"{what} must be an integer")
    if value < minimum or value > MAX_AMOUNT:
        raise InvalidAmount(f"{what} must be between {minimum} and {MAX_AMOUNT}")
    return value


def check_text(value: object, what: str, max_length: int = MAX_ID_LENGTH) -> str:
    """``value`` as 1 to ``max_length`` characters without a control character."""
    if not isinstance(value, str):
        raise InvalidAmount(f"{what} must be a string")
    if not 1 <= len(value) <= max_length:
        raise InvalidAmount(f"{what} must have 1 to {max_length} characters")
    if not _PRINTABLE.fullmatch(value):
        raise InvalidAmount(f"{what} must not contain control characters")
    return value


def check_balance(value: int, what: str) -> None:
    """Refuse a balance the read models could not hold."""
    if value > MAX_BALANCE:
        raise InvalidAmount(f"{what} would exceed {MAX_BALANCE}")


def check_day(value: date, what: str) -> date:
    """``value`` within ``MIN_DAY`` .. ``MAX_DAY``."""
    if not MIN_DAY <= value <= MAX_DAY:
        raise InvalidAmount(f"{what} must be between {MIN_DAY} and {MAX_DAY}")
    return value
