"""The field types every command model shares: ids, reasons, days, stored integers,
user ids, event types and RFC 3339 timestamps (``parse_rfc3339``, which the CLI uses
too). Their bounds are ``loyalty.domain.limits`` (the domain refuses the same)."""

from __future__ import annotations

import re
from datetime import UTC, date, datetime
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    Field,
    StringConstraints,
    TypeAdapter,
)

from loyalty.domain.limits import (
    MAX_DAY,
    MAX_ID_LENGTH,
    MAX_REASON_LENGTH,
    MAX_STORED_INT,
    MIN_DAY,
    PRINTABLE_PATTERN,
)
from loyalty.domain.user_ids import MAX_LENGTH, check_user_id

RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})$")


# Printable text: no control characters (they break logs, CSV exports and COPY).
Identifier = Annotated[
    str,
    StringConstraints(min_length=1, max_length=MAX_ID_LENGTH, pattern=PRINTABLE_PATTERN),
]
Reason = Annotated[
    str,
    StringConstraints(min_length=1, max_length=MAX_REASON_LENGTH, pattern=PRINTABLE_PATTERN),
]
Day = Annotated[date, Field(ge=MIN_DAY, le=MAX_DAY)]
"""A UTC day (YYYY-MM-DD) whose arithmetic cannot overflow (``loyalty.domain.limits``):
every date a route, page or command takes is one."""
StoredInt = Annotated[int, Field(ge=0, le=MAX_STORED_INT)]
"""A non-negative integer a table can hold (a rule version, a position)."""
DAY = TypeAdapter(Day)
STORED_INT = TypeAdapter(StoredInt)


EventType = Annotated[str, StringConstraints(pattern=r"^[a-z0-9_.-]{1,64}$")]
USER_ID_PATTERN = r"^[^\x00-\x1f\x7f/]+$"
"""The part of the user-id rule a regular expression can say (for the fast paths and
OpenAPI); :func:`loyalty.domain.user_ids.check_user_id` says the rest."""
UserIdentifier = Annotated[
    str,
    StringConstraints(min_length=1, max_length=MAX_LENGTH, pattern=USER_ID_PATTERN),
    AfterValidator(check_user_id),
]
"""A user id (see ``loyalty.domain.user_ids``): NFC, no control, format or surrogate
characters, no U+FFFD, no ``/``, not ``.`` or ``..``, at most 128 characters."""


def parse_rfc3339(value: str) -> datetime:
    """An RFC 3339 timestamp with an explicit offset, converted to UTC."""
    if not RFC3339.match(value):
        raise ValueError("must be an RFC 3339 timestamp with offset, e.g. 2026-01-31T12:00:00Z")
    text = value.replace("t", "T").replace("z", "Z")
    head, sep, frac = text.partition(".")
    if sep:  # Python keeps microseconds: cut extra fractional digits
        digits = re.match(r"\d+", frac)
        assert digits is not None
        text = f"{head}.{digits.group()[:6]}{frac[len(digits.group()) :]}"
    try:
        return datetime.fromisoformat(text).astimezone(UTC)
    except (ValueError, OverflowError) as exc:
        raise ValueError(f"is not a valid timestamp: {exc}") from None


def rfc3339_field(value: Any) -> datetime:
    if not isinstance(value, str):
        raise ValueError("must be an RFC 3339 timestamp string with offset")
    return parse_rfc3339(value)
