"""Wire schemas (pydantic v2), separate from domain objects."""

from __future__ import annotations

import re
from datetime import UTC, date, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    StringConstraints,
    TypeAdapter,
)

from loyalty.api.guards import BodyProblem, parse_json_document
from loyalty.application.commands.rules import (
    RulesBody,
    RulesRequest,
)
from loyalty.domain.limits import (
    MAX_AMOUNT,
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


class ReportRange(BaseModel):
    """A range of UTC days, both included (the reports; blank: the page's default)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    from_: Day | None = Field(None, alias="from")
    to: Day | None = None


class DryRunPeriod(BaseModel):
    """The console's dry-run period: UTC days ``from`` .. ``through``, both included."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    from_: Day = Field(alias="from")
    through: Day


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


def _rfc3339(value: Any) -> datetime:
    if not isinstance(value, str):
        raise ValueError("must be an RFC 3339 timestamp string with offset")
    return parse_rfc3339(value)


class IngressEvent(BaseModel):
    """One activity event."""

    model_config = ConfigDict(extra="forbid")

    event_id: Identifier = Field(description="unique per source; a resend is a duplicate")
    user_id: UserIdentifier = Field(
        description="opaque member id: NFC, no control/format characters, no /, <= 128"
    )
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

    batch_id: Identifier | None = Field(
        default=None,
        description=(
            "the client's label of this request, echoed in the response (a random one "
            "when omitted) so that a client can match responses and logs to requests. "
            "It is not stored and not a key of idempotency: a batch is idempotent per "
            "event (a resent event_id is a duplicate), so resending a batch, under the "
            "same batch_id or another, stores only the events not stored before"
        ),
    )
    events: list[IngressEvent]


class RejectedEvent(BaseModel):
    index: int
    event_id: str
    reason: str = Field(description="too_old | in_future | forgotten")


class DuplicateEvent(BaseModel):
    index: int = Field(description="position of the event in the batch")
    event_id: str
    kind: Literal["repeat", "conflict"] = Field(
        description=(
            "repeat: the same event (user_id, type, occurred_at, attributes) was sent "
            "before (in this batch or stored earlier); conflict: this event_id was used "
            "before for other content -- this event was not stored"
        )
    )


class BatchAccepted(BaseModel):
    batch_id: str = Field(description="the request's batch_id, or a generated one")
    accepted: int = Field(description="events stored")
    duplicates: int = Field(description="events not stored: their event_id was seen before")
    rejected: list[RejectedEvent]
    conflicts: int = Field(description="how many of the duplicates are conflicts")
    duplicate_events: list[DuplicateEvent] = Field(description="each duplicate, in batch order")
    unweighed_types: dict[str, int] = Field(
        description=(
            "accepted events by type, for the types no rule of the current rule set "
            "weighs (they earn nothing now; a later rule set may weigh them)"
        )
    )


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
    pending_currency: int = Field(
        0,
        description="part of currency earned but not yet recorded on the account "
        "(recorded at the award interval, a rank change or the member's next command)",
    )
    pending_rank_points: int = Field(0, description="part of rank_points not yet recorded")
    expiring: list[ExpiringBody] = Field(
        [],
        description="the next expiries under the rules' currency_expiry, soonest first: "
        "each amount expires at the end of its day (UTC) unless spent first",
    )
    rank_points_this_period: int = Field(
        0,
        description="rank points of the current qualification period (lifetime rank "
        "points when the rules have no rank_qualification)",
    )
    rank_valid_until: date | None = Field(
        None, description="the last day the rank is held without more points (null: kept)"
    )
    rank_points_to_keep: int = Field(0, description="rank points still needed to keep the rank")
    rank_points_to_next: int | None = Field(
        None, description="rank points still needed for the next rank (null: none above)"
    )


class ExpiringBody(BaseModel):
    amount: int
    on: date = Field(description="expires at the end of this day (UTC)")


def rules_document(body: bytes) -> dict[str, Any]:
    """The one reading of a rules document, for every entrypoint (``PUT /v1/rules``, the
    console's editor and dry run, ``loyalty rules load|dry-run|apply``): JSON as
    :func:`~loyalty.api.guards.parse_json_document` reads it (an object repeating a key is
    refused), and an object; the command model
    (:class:`loyalty.application.commands.rules.RulesRequest`) judges the rest.
    Raises :class:`~loyalty.api.guards.BodyProblem`."""
    wire = parse_json_document(body)
    if not isinstance(wire, dict):
        raise BodyProblem(422, "invalid_rules", "must be a JSON object")
    return wire


class PipelineBody(BaseModel):
    pending: int = Field(description="ingress events not yet processed")
    oldest_pending_age_s: float | None = Field(description="age of the oldest pending event")
    processed_total: int
    awards_total: int
    quarantined_events: int = Field(
        0,
        description="account events the read models passed over because they could not "
        "apply them (see `loyalty doctor`); 0 when healthy",
    )


# ------------------------------------------------------------------------- spending

# Strict: 1.5, "5", true and 5.0 are refused (422), never coerced.
# Bounds: ``loyalty.domain.limits`` (the domain refuses the same).
Amount = Annotated[int, Strict(), Field(gt=0, le=MAX_AMOUNT)]
SignedAmount = Annotated[int, Strict(), Field(ge=-MAX_AMOUNT, le=MAX_AMOUNT)]


class SpendRequest(BaseModel):
    """Spend currency on an order; idempotent by ``order_id``."""

    model_config = ConfigDict(extra="forbid")

    order_id: Identifier = Field(description="the shop's order id; a replay is idempotent")
    amount: Amount = Field(description="positive integer amount of currency")
    description: Annotated[str, StringConstraints(max_length=256)] | None = Field(
        None, description="accepted for the shop's convenience; never stored"
    )


class RefundRequest(BaseModel):
    """Refund a spent order, once, in full."""

    model_config = ConfigDict(extra="forbid")

    order_id: Identifier
    source: Identifier | None = Field(
        None,
        description="operator keys only: the name of the key that spent the order (a "
        "shop's), to refund it on the shop's behalf; the operator is recorded on the "
        "refund. Default: the caller's own order",
    )


class OrderBody(BaseModel):
    """The result of a spend or refund. A repeated request (same order id) is not done
    again: it answers with the original result, marked ``replayed: true`` and the
    ``Idempotent-Replayed: true`` header. ``amount`` and ``currency`` are then historical
    (as right after the original request); read ``GET /v1/members/{user_id}`` for the
    balance now."""

    order_id: str
    amount: int = Field(description="the amount spent or refunded by the original request")
    currency: int = Field(
        description="the member's balance right after the original request (historical on "
        "a replay: later awards, spends and refunds are not in it)"
    )
    replayed: bool = Field(
        False,
        description="true: this request repeats an earlier one, which did the work; this is "
        "that request's result (the response also carries `Idempotent-Replayed: true`)",
    )


class AdjustmentRequest(BaseModel):
    """An operator correction; either amount may be negative."""

    model_config = ConfigDict(extra="forbid")

    adjustment_id: Identifier = Field(description="idempotency key of the adjustment")
    currency: SignedAmount
    rank_points: SignedAmount
    reason: Reason = Field(description="why (stored in the account's events: no personal data)")


class HistoryEntryBody(BaseModel):
    kind: str = Field(description="award | spend | refund | adjustment | rank_changed")
    currency: int = Field(description="signed change of the spendable balance")
    rank_points: int = Field(description="signed change of the rank points")
    at: datetime = Field(description="RFC 3339, UTC")
    ref: str | None = Field(description="award id, order id, adjustment id or new rank")
    explanation: str | None = Field(None, description="for an award: the path of its explanation")


class HistoryBody(BaseModel):
    entries: list[HistoryEntryBody]
    next: str | None = Field(description="cursor of the next (older) page; null at the end")


class LeaderboardEntry(BaseModel):
    user_id: str
    rank_points: int
    rank: str | None


class LeaderboardBody(BaseModel):
    entries: list[LeaderboardEntry]


class ForgetRequestBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user_id: UserIdentifier = Field(description="the member to erase everywhere")


class ForgetAccepted(BaseModel):
    request_id: str
    status: str = Field(description="pending | running | completed")


class ForgetReceipt(BaseModel):
    """What was erased, where and when; never the user id."""

    request_id: str
    status: str
    requested_at: datetime
    completed_at: datetime | None
    erased: dict[str, int] = Field(description="rows erased per location")


# ------------------------------------------------------------------ OpenAPI examples
# Shown at /docs. Kept apart from the classes above (each example is validated against
# its model by tests/e2e/test_openapi_examples.py). Batch and IngressEvent get theirs in
# ``create_app``'s OpenAPI document.

_WHEN = "2026-11-26T10:00:00Z"
OPENAPI_EXAMPLES: dict[type[BaseModel], dict[str, Any]] = {
    BatchAccepted: {
        "batch_id": "b-1",
        "accepted": 2,
        "duplicates": 1,
        "rejected": [{"index": 3, "event_id": "e-4", "reason": "too_old"}],
        "conflicts": 1,
        "duplicate_events": [{"index": 2, "event_id": "e-1", "kind": "conflict"}],
        "unweighed_types": {"levelled_up": 1},
    },
    Problem: {
        "type": "about:blank",
        "title": "Unprocessable content",
        "status": 422,
        "code": "validation_error",
        "errors": [{"loc": "events[3].occurred_at", "msg": "must be an RFC 3339 timestamp"}],
    },
    Health: {"status": "ok"},
    MemberBody: {
        "user_id": "alice",
        "currency": 11,
        "rank_points": 21,
        "rank": "bronze",
        "privileges": ["member_prices"],
        "lifetime_currency": 11,
        "pending_currency": 3,
        "pending_rank_points": 6,
    },
    RulesBody: {
        "version": 2,
        "rules": [
            {"event_type": "logged_on", "currency": 1, "rank_points": 1, "daily_cap": 1},
            {
                "event_type": "played_game",
                "currency": 5,
                "rank_points": 10,
                "multipliers": [{"when": {"result": "win"}, "factor": "2"}],
                "daily_cap": 50,
            },
        ],
        "ranks": [
            {"name": "bronze", "min_rank_points": 0, "privileges": ["member_prices"]},
            {
                "name": "silver",
                "min_rank_points": 1000,
                "privileges": ["member_prices", "free_shipping"],
            },
        ],
    },
    PipelineBody: {
        "pending": 1200,
        "oldest_pending_age_s": 0.8,
        "processed_total": 5_400_000,
        "awards_total": 61_000,
    },
    SpendRequest: {"order_id": "o-1", "amount": 5, "description": "coffee mug"},
    RefundRequest: {"order_id": "o-1"},
    OrderBody: {"order_id": "o-1", "amount": 5, "currency": 6, "replayed": False},
    AdjustmentRequest: {
        "adjustment_id": "adj-7",
        "currency": 50,
        "rank_points": 0,
        "reason": "goodwill: ticket 4711",
    },
    HistoryBody: {
        "entries": [
            {"kind": "spend", "currency": -5, "rank_points": 0, "at": _WHEN, "ref": "o-1"},
            {
                "kind": "award",
                "currency": 11,
                "rank_points": 21,
                "at": _WHEN,
                "ref": "w3.0.2",
                "explanation": "/v1/members/alice/awards/w3.0.2",
            },
        ],
        "next": None,
    },
    LeaderboardBody: {"entries": [{"user_id": "alice", "rank_points": 21, "rank": "bronze"}]},
    ForgetRequestBody: {"user_id": "alice"},
    ForgetAccepted: {"request_id": "f-3b1c9e", "status": "pending"},
    ForgetReceipt: {
        "request_id": "f-3b1c9e",
        "status": "completed",
        "requested_at": _WHEN,
        "completed_at": "2026-11-26T10:00:02Z",
        "erased": {"member_events": 12, "member_balances": 1, "ingress_events": 40},
    },
}
OPENAPI_EXAMPLES[RulesRequest] = {
    k: v for k, v in OPENAPI_EXAMPLES[RulesBody].items() if k != "version"
}
for _model, _example in OPENAPI_EXAMPLES.items():
    _model.model_config["json_schema_extra"] = {"examples": [_example]}


# -------------------------------------------------------------------------- storage


class StorageLocationBody(BaseModel):
    name: str = Field(description="table (PostgreSQL: each ingress day partition on its own)")
    kind: str = Field(description="ingress, event_store, read_model, pipeline, forget or other")
    rows: int
    bytes: int = Field(description="table, indexes and TOAST (SQLite: pages per dbstat)")


class StorageTotalBody(BaseModel):
    rows: int
    bytes: int


class StorageBody(BaseModel):
    backend: str
    locations: list[StorageLocationBody]
    total: StorageTotalBody
    database_bytes: int = Field(description="the whole database (SQLite: file plus WAL)")
    estimated: bool = Field(description="SQLite without dbstat: bytes shared out by row count")

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "backend": "postgresql",
                    "locations": [
                        {
                            "name": "ingress_events_p20261126",
                            "kind": "ingress",
                            "rows": 1000000,
                            "bytes": 412000000,
                        },
                        {"name": "members_events", "kind": "event_store", "rows": 1200, "bytes": 0},
                    ],
                    "total": {"rows": 1001200, "bytes": 412000000},
                    "database_bytes": 420000000,
                    "estimated": False,
                }
            ]
        }
    )


# ---------------------------------------------------------------- explanations (#20)


class AmountsBody(BaseModel):
    """``carried_in + contributed == credited + carried_out``, exactly (decimal strings)."""

    contributed: str = Field(description="exact sum of the events' weights, before rounding")
    carried_in: str = Field(description="the account's fraction before the award")
    credited: int = Field(description="whole units credited (or to be credited, if pending)")
    carried_out: str = Field(description="the fraction carried to the next award")


class ExplanationBody(BaseModel):
    user_id: str
    award_id: str
    kind: str = Field(description="award (the pipeline) | compensation (rules apply)")
    status: str = Field(description="recorded | pending (not yet on the account)")
    recorded_at: str | None
    rule_version: int = Field(description="the rule version of the newest window in it")
    rule_versions: list[int] = Field(description="every rule version that weighed its events")
    event_count: int
    currency: AmountsBody
    rank_points: AmountsBody
    complete: bool = Field(
        description="the per-type sums add up to the award (false only for earnings "
        "counted before explanations were kept)"
    )
    by_event_type: list[dict[str, Any]] = Field(
        description="per event type: events, capped [{daily_cap, events}], multipliers "
        "[{when, factor, events}], exact currency and rank_points contributed"
    )
    compensation: dict[str, Any] | None = Field(
        None, description="for a compensation: the rule versions, period and shortfall"
    )
    events: dict[str, Any] = Field(
        description="contributing ingress events: status retained | partial | expired "
        "(after retention) | none; items [{source, event_id, event_type, occurred_at}] "
        "(at most 1000, truncated says so)"
    )


class DryRunRequest(BaseModel):
    """A candidate rule set and a period of whole UTC days inside retention."""

    model_config = ConfigDict(extra="forbid")

    rules: dict[str, Any] = Field(description="a rules document, as for PUT /v1/rules")
    from_: Day | None = Field(None, alias="from", description="first day (YYYY-MM-DD)")
    to: Day | None = Field(
        None, description="last day (YYYY-MM-DD), included; default today (from: the day before)"
    )


class DryRunBody(BaseModel):
    period: dict[str, str] = Field(description="{from, to}: whole UTC days, both included")
    warnings: list[str] = Field(
        default_factory=list, description="e.g. the period holds no retained events"
    )
    current_version: int
    events: int = Field(description="retained ingress events weighed")
    members: int
    members_with_difference: int
    members_with_different_rank: int
    totals: dict[str, Any] = Field(
        description="currency and rank_points: {current, candidate, difference} (exact)"
    )
    largest_differences: list[dict[str, Any]] = Field(
        description="the 20 largest per-member differences: user_id, currency, "
        "rank_points ({current, candidate, difference}), rank {current, candidate}"
    )
    by_event_type: list[dict[str, Any]] = Field(
        description="per event type: events, capped {current, candidate}, currency, rank_points"
    )
    seconds: float


_EXPLAIN_EXAMPLES: dict[type[BaseModel], dict[str, Any]] = {
    ExplanationBody: {
        "user_id": "alice",
        "award_id": "w3.0.2",
        "kind": "award",
        "status": "recorded",
        "recorded_at": _WHEN,
        "rule_version": 4,
        "rule_versions": [4],
        "event_count": 53,
        "currency": {
            "contributed": "37.5",
            "carried_in": "0.25",
            "credited": 37,
            "carried_out": "0.75",
        },
        "rank_points": {"contributed": "75", "carried_in": "0", "credited": 75, "carried_out": "0"},
        "complete": True,
        "by_event_type": [
            {
                "event_type": "played_game",
                "known": True,
                "events": 53,
                "capped": [{"daily_cap": 50, "events": 3}],
                "multipliers": [{"when": {"result": "win"}, "factor": "1.5", "events": 10}],
                "currency": "37.5",
                "rank_points": "75",
            }
        ],
        "compensation": None,
        "events": {
            "status": "retained",
            "retained": 53,
            "truncated": False,
            "items": [
                {
                    "source": "gamesite",
                    "event_id": "e-1",
                    "event_type": "played_game",
                    "occurred_at": _WHEN,
                }
            ],
        },
    },
    DryRunRequest: {
        "rules": {
            "rules": [{"event_type": "logged_on", "currency": 2, "rank_points": 1, "daily_cap": 1}],
            "ranks": [{"name": "bronze", "min_rank_points": 0}],
        },
        "from": "2026-11-27",
        "to": "2026-11-28",
    },
    DryRunBody: {
        "period": {"from": "2026-11-27", "to": "2026-11-28"},
        "current_version": 4,
        "events": 1_000_000,
        "members": 20_000,
        "members_with_difference": 18_200,
        "members_with_different_rank": 35,
        "totals": {
            "currency": {"current": 2_100_000, "candidate": "2150000.5", "difference": "50000.5"},
            "rank_points": {"current": 900_000, "candidate": 900_000, "difference": 0},
        },
        "largest_differences": [
            {
                "user_id": "alice",
                "currency": {"current": 120, "candidate": 180, "difference": 60},
                "rank_points": {"current": 40, "candidate": 40, "difference": 0},
                "rank": {"current": "bronze", "candidate": "bronze"},
            }
        ],
        "by_event_type": [
            {
                "event_type": "logged_on",
                "events": 30_000,
                "capped": {"current": 9_000, "candidate": 9_000},
                "currency": {"current": 21_000, "candidate": 42_000, "difference": 21_000},
                "rank_points": {"current": 21_000, "candidate": 21_000, "difference": 0},
            }
        ],
        "seconds": 7.9,
    },
}
OPENAPI_EXAMPLES.update(_EXPLAIN_EXAMPLES)
for _model, _example in _EXPLAIN_EXAMPLES.items():
    _model.model_config["json_schema_extra"] = {"examples": [_example]}
