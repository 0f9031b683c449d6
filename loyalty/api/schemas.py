"""Wire schemas (pydantic v2), separate from domain objects."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints

RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})$")

# Printable text: no control characters (they break logs, CSV exports and COPY).
Identifier = Annotated[
    str, StringConstraints(min_length=1, max_length=128, pattern=r"^[^\x00-\x1f\x7f]+$")
]
EventType = Annotated[str, StringConstraints(pattern=r"^[a-z0-9_.-]{1,64}$")]


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


def _rfc3339(value: Any) -> datetime:
    if not isinstance(value, str):
        raise ValueError("must be an RFC 3339 timestamp string with offset")
    return parse_rfc3339(value)


class IngressEvent(BaseModel):
    """One activity event."""

    model_config = ConfigDict(extra="forbid")

    event_id: Identifier = Field(description="unique per source; a resend is a duplicate")
    user_id: Identifier = Field(description="opaque member id")
    type: EventType = Field(description="activity type, e.g. played_game")
    occurred_at: Annotated[datetime, BeforeValidator(_rfc3339)] = Field(
        description="RFC 3339 with an explicit offset", examples=["2026-11-26T10:00:00Z"]
    )
    attributes: dict[str, Any] = Field(
        default_factory=dict, description="free-form, at most 4 KiB as JSON"
    )


class Batch(BaseModel):
    """A batch of activity events from one source."""

    model_config = ConfigDict(extra="forbid")

    batch_id: Annotated[str, StringConstraints(min_length=1, max_length=128)] | None = None
    events: list[IngressEvent]


class RejectedEvent(BaseModel):
    index: int
    event_id: str
    reason: str = Field(description="too_old | in_future")


class BatchAccepted(BaseModel):
    batch_id: str
    accepted: int
    duplicates: int
    rejected: list[RejectedEvent]


class FieldError(BaseModel):
    loc: str = Field(description="e.g. events[3].occurred_at")
    msg: str


class Problem(BaseModel):
    """RFC 9457 problem details."""

    model_config = ConfigDict(extra="allow")

    type: str = "about:blank"
    title: str
    status: int
    code: str = Field(description="stable machine-readable error code")
    detail: str | None = None
    errors: list[FieldError] | None = None


class Health(BaseModel):
    status: str


class MemberBody(BaseModel):
    user_id: str
    currency: int = Field(description="spendable balance")
    rank_points: int = Field(description="lifetime rank points")
    rank: str | None
    privileges: list[str]
    lifetime_currency: int = Field(description="currency ever earned (awards + adjustments)")


class MultiplierBody(BaseModel):
    when: dict[str, str | int | float | bool | None]
    factor: int | str = Field(description="decimal, e.g. \"1.5\"")


class RuleBody(BaseModel):
    event_type: str
    currency: int | str = Field(description="non-negative decimal")
    rank_points: int | str = Field(description="non-negative decimal")
    multipliers: list[MultiplierBody] = []
    daily_cap: int | None = None


class RankBody(BaseModel):
    name: str
    min_rank_points: int
    privileges: list[str] = []


class RulesBody(BaseModel):
    version: int
    rules: list[RuleBody]
    ranks: list[RankBody]


class PipelineBody(BaseModel):
    pending: int = Field(description="ingress events not yet processed")
    oldest_pending_age_s: float | None = Field(description="age of the oldest pending event")
    processed_total: int
    awards_total: int
